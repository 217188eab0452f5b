// Internal to the converter: a checkpoint layout as a byte-exact map onto "canonical" tensors.
//
// Canonical tensors are the HF per-expert parameters (expected_parameters(config, PerExpert)).
// A layout lists the tensors a format stores (per tensor-parallel part) and, for each, the
// canonical element ranges it is made of, in order. Every layout we support is a permutation
// of canonical elements (plus replicated copies), so the same description serves both ways:
//   output: write each layout tensor by copying its segments out of the canonical tensors;
//   input:  invert the segments to find each canonical element range inside the input files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "opensci/checkpoint.hpp"
#include "opensci/config.hpp"
#include "opensci/convert.hpp"

namespace opensci::convert {

// Elements [offset, offset + length) of canonical tensor `canonical` (flattened, row-major).
struct Segment {
  std::string canonical;
  int64_t offset = 0;
  int64_t length = 0;
};

struct TensorSpec {
  int part = 0;  // tensor-parallel rank (0 for HF layouts)
  std::string name;
  std::vector<std::string> aliases;  // other names accepted on input (non-TE Megatron norms)
  std::vector<int64_t> shape;
  bool replica = false;  // a copy of a tensor rank 0 also holds (Megatron ranks > 0)
  std::vector<Segment> segments;
};

// HF names; sparse layer l stored as layouts[l] (one entry per layer, dense layers ignored).
std::vector<TensorSpec> hf_layout(const ModelConfig& config, const std::vector<ExpertLayout>& layouts);

// Megatron-core names for `tp` ranks. Throws when a dimension does not split over tp.
std::vector<TensorSpec> megatron_layout(const ModelConfig& config, int tp, MegatronExperts experts);

}  // namespace opensci::convert
