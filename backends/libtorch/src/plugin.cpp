// The exported table of the libtorch plugin (see include/opensci/libtorch/plugin.hpp).
#include "opensci/libtorch/plugin.hpp"

extern "C" __attribute__((visibility("default"))) const opensci::libtorch::PluginApi* opensci_libtorch_plugin_api() {
  static const opensci::libtorch::PluginApi api{opensci::libtorch::kPluginAbi, &opensci::libtorch::forward,
                                                &opensci::libtorch::torch_version,
                                                &opensci::libtorch::cuda_available};
  return &api;
}
