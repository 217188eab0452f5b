// A checkpoint parameter in the forward's precision, shared by the unsharded reference forward
// (forward.cpp) and the sharded one (parallel/): one loader, one dtype conversion.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "opensci/checkpoint.hpp"

namespace opensci {

// A zero-copy view into the mapped file when the checkpoint already stores the tensor as Real
// (F32 on the fast path), an owned converted copy otherwise. Empty (data() == nullptr) is an
// absent optional parameter (a bias the lineage does not have).
template <typename Real>
struct Param {
  std::vector<Real> owned;
  const Real* ptr = nullptr;
  const Real* data() const { return ptr; }
};

// Elements [first, first + count) of tensor `name` (flattened), after checking its shape against
// `shape` (the config's): "file: tensor 'x' has shape [..], expected [..] from the config".
template <typename Real>
Param<Real> load_param_elements(const Checkpoint& ck, const std::string& name, const std::vector<int64_t>& shape,
                                int64_t first, int64_t count) {
  const auto& file = ck.file_of(name);
  file.check_shape(name, shape);
  Param<Real> p;
  if constexpr (std::is_same_v<Real, float>) {
    // The view only for a range inside the tensor; any other range goes to the converting
    // reader, whose error names file, tensor, shape and range.
    if (file.at(name).dtype == DType::F32 && first >= 0 && count >= 0 && first + count <= element_count(shape)) {
      p.ptr = file.view_f32(name).data() + first;
      return p;
    }
  }
  if constexpr (std::is_same_v<Real, double>)
    p.owned = file.read_f64_range(name, first, count);
  else
    p.owned = file.read_f32_range(name, first, count);
  p.ptr = p.owned.data();
  return p;
}

template <typename Real>
Param<Real> load_param(const Checkpoint& ck, const std::string& name, const std::vector<int64_t>& shape) {
  return load_param_elements<Real>(ck, name, shape, 0, element_count(shape));
}

template <typename Real>
Param<Real> load_param_optional(const Checkpoint& ck, bool present, const std::string& name,
                                const std::vector<int64_t>& shape) {
  return present ? load_param<Real>(ck, name, shape) : Param<Real>{};
}

}  // namespace opensci
