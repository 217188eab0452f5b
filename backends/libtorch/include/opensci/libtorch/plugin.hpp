// The libtorch backend as a plugin: opensci-compat and the test programs do not link libtorch
// (loading it costs ~0.9 s of CPU per process start, paid by every CTest test that runs the
// CLI); the harness dlopen()s this module the first time a cell asks for backend libtorch
// (harness/src/backends.cpp). The module exports one C symbol returning this table; the ABI
// number changes with the table or with TorchForwardOptions.
#pragma once

#include <string>

#include "opensci/libtorch/forward.hpp"

namespace opensci::libtorch {

inline constexpr int kPluginAbi = 1;
inline constexpr const char* kPluginSymbol = "opensci_libtorch_plugin_api";

struct PluginApi {
  int abi;
  ForwardResult (*forward)(const Checkpoint&, const TokenBatch&, const TorchForwardOptions&);
  std::string (*torch_version)();
  bool (*cuda_available)();
};

}  // namespace opensci::libtorch
