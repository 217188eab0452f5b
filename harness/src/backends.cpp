#include "opensci/harness/backends.hpp"

#include <fmt/ranges.h>

#include "opensci/error.hpp"
#if defined(OPENSCI_HAVE_GPU_FORWARD)
#include "opensci/gpu/forward.hpp"
#endif
#if defined(OPENSCI_LIBTORCH_PLUGIN)
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "opensci/libtorch/plugin.hpp"
#endif

namespace opensci::harness {
namespace {

// The GPU backend's name is its platform: "cuda", "hip", or "emulation" (host-thread device).
[[maybe_unused]] std::string gpu_backend_name() {
#if defined(OPENSCI_GPU_CUDA)
  return "cuda";
#elif defined(OPENSCI_GPU_HIP)
  return "hip";
#else
  return "emulation";
#endif
}

#if defined(OPENSCI_LIBTORCH_PLUGIN)
// The libtorch backend, loaded once per process on first use. OPENSCI_LIBTORCH_PLUGIN (the
// environment variable) overrides the module's path (a relocated build).
const libtorch::PluginApi& libtorch_plugin() {
  static const libtorch::PluginApi* api = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("OPENSCI_LIBTORCH_PLUGIN");
    const std::string path = env && *env ? env : OPENSCI_LIBTORCH_PLUGIN;
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) fail("backend libtorch: cannot load the plugin {}: {}", path, ::dlerror());
    using Entry = const libtorch::PluginApi* (*)();
    auto entry = reinterpret_cast<Entry>(::dlsym(handle, libtorch::kPluginSymbol));
    if (!entry) fail("backend libtorch: {} has no symbol {}: {}", path, libtorch::kPluginSymbol, ::dlerror());
    const auto* table = entry();
    if (!table || table->abi != libtorch::kPluginAbi)
      fail("backend libtorch: {} has plugin ABI {}, this binary needs {} (a stale build: rebuild opensci_libtorch_plugin)",
           path, table ? table->abi : -1, libtorch::kPluginAbi);
    api = table;
  });
  return *api;
}
#endif

}  // namespace

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"cpu"};
#if defined(OPENSCI_LIBTORCH_PLUGIN)
  names.push_back("libtorch");
#endif
#if defined(OPENSCI_HAVE_GPU_FORWARD)
  names.push_back(gpu_backend_name());
#endif
  return names;
}

ForwardResult run_reference(const std::string& backend, const Checkpoint& ck, const TokenBatch& tokens,
                            const std::string& precision, bool capture_hidden, const std::string& defect) {
  if (!defect.empty() && backend != "cpu") fail("reference defects (mutation tests) exist on backend cpu only, not '{}'", backend);
  if (backend == "cpu") {
    if (precision != "fp64" && precision != "fp32" && precision != "bf16")
      fail("backend cpu runs precision fp64 (golden), fp32 (fast) or bf16 (fast, bf16 storage), not '{}'", precision);
    const auto p = precision == "fp64" ? Precision::Golden : precision == "fp32" ? Precision::Fast : Precision::BF16;
    return forward(ck, tokens, {p, capture_hidden, defect});
  }
#if defined(OPENSCI_LIBTORCH_PLUGIN)
  if (backend == "libtorch") {  // on the GPU when this libtorch has one, else on the CPU
    if (precision != "fp64" && precision != "fp32" && precision != "bf16")
      fail("backend libtorch runs precision fp64, fp32 or bf16, not '{}'", precision);
    const auto& torch = libtorch_plugin();
    libtorch::TorchForwardOptions o;
    o.dtype = precision;
    o.device = torch.cuda_available() ? "cuda" : "cpu";
    o.capture_hidden = capture_hidden;
    return torch.forward(ck, tokens, o);
  }
#endif
#if defined(OPENSCI_HAVE_GPU_FORWARD)
  if (backend == gpu_backend_name()) {
    if (precision != "fp32" && precision != "bf16")
      fail("backend {} runs precision fp32 or bf16, not '{}'", backend, precision);
    gpu::GpuForwardOptions o;
    o.dtype = precision == "bf16" ? gpu::DType::BF16 : gpu::DType::F32;
    return gpu::forward(ck, tokens, o, capture_hidden);
  }
#endif
  const std::string option = backend == "libtorch" ? " (configure with -DOPENSCI_WITH_LIBTORCH=ON)"
                             : backend == "cuda"   ? " (configure a separate build with -DOPENSCI_WITH_CUDA=ON)"
                             : backend == "hip"    ? " (configure a separate build with -DOPENSCI_WITH_HIP=ON)"
                                                   : "";
  fail("reference backend '{}' is not built into this binary{}; available: {}", backend, option,
       fmt::join(available_backends(), ", "));
}

}  // namespace opensci::harness
