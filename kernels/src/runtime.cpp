// Host side of the GPU layer: errors, the device probe, dtype helpers.
#include <fmt/format.h>

#include <cstring>

#include "opensci/error.hpp"
#include "opensci/gpu/device.hpp"
#include "opensci/gpu/resource_groups.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::gpu {

void fail_runtime_call(const char* call, int code, const char* name, const char* text, const char* file, int line) {
  fail("{} call `{}` failed at {}:{}: {} ({}): {}", rt::kPlatform, call, file, line, name, code, text);
}

void fail_gpu(const std::string& message) { throw Error(message); }

size_t dtype_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }
std::string_view dtype_name(DType dtype) { return dtype == DType::F32 ? "fp32" : "bf16"; }

DeviceProbe probe_device() {
  DeviceProbe p;
  const rt::Error e = rt::get_device_count(&p.count);
#if defined(OPENSCI_GPU_CUDA)
  constexpr const char* call = "cudaGetDeviceCount";
#elif defined(OPENSCI_GPU_HIP)
  constexpr const char* call = "hipGetDeviceCount";
#else
  constexpr const char* call = "emulated get_device_count";
#endif
  if (e != rt::kSuccess) {
    p.count = 0;
    p.reason = fmt::format("no {} device: {} returned {} ({}): {}", rt::kPlatform, call, rt::error_name(e),
                           static_cast<int>(e), rt::error_string(e));
    static_cast<void>(rt::get_last_error());  // clear the sticky error for later calls
    return p;
  }
  if (p.count == 0) {
    p.reason = fmt::format("no {} device: {} returned success with 0 devices", rt::kPlatform, call);
    return p;
  }
  const GpuSelection selection = select_gpu_from_environment(p.count);
  p.device = selection.device;
  p.selection = selection.source;
  OPENSCI_GPU_CHECK(rt::set_device(p.device));
  p.available = true;
  if (rt::device_name(p.device, &p.name) != rt::kSuccess) p.name = fmt::format("device {}", p.device);
  return p;
}

std::vector<std::byte> to_storage(DType dtype, const std::vector<float>& values) {
  std::vector<std::byte> out(values.size() * dtype_size(dtype));
  if (dtype == DType::F32) {
    if (!values.empty()) std::memcpy(out.data(), values.data(), out.size());
  } else {
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t b = f32_to_bf16(values[i]);
      std::memcpy(out.data() + 2 * i, &b, 2);
    }
  }
  return out;
}

std::vector<float> from_storage(DType dtype, const void* bytes, size_t count) {
  std::vector<float> out(count);
  const auto* p = static_cast<const std::byte*>(bytes);
  if (dtype == DType::F32) {
    if (count) std::memcpy(out.data(), p, count * 4);
  } else {
    for (size_t i = 0; i < count; ++i) {
      uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      out[i] = bf16_to_f32(b);
    }
  }
  return out;
}

}  // namespace opensci::gpu
