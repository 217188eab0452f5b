// Host-side device handling: is there a device, and RAII device memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "opensci/gpu/ops.hpp"
#include "opensci/gpu/portability.hpp"

namespace opensci::gpu {

// Whether this build's platform has a usable device, and if not, why, in the runtime's words:
// "no CUDA device: cudaGetDeviceCount returned cudaErrorInsufficientDriver (35): ...".
// When there is one, the probe also selects this process's device (rt::set_device): the GPU CTest
// allocated to the test (CTEST_RESOURCE_GROUP_<n>_GPUS, see resource_groups.hpp), else
// OPENSCI_GPU_DEVICE, else 0. A malformed allocation, or one naming a missing device, throws.
struct DeviceProbe {
  bool available = false;
  int count = 0;
  int device = 0;         // the selected device, when available
  std::string selection;  // why that one: "CTEST_RESOURCE_GROUP_0_GPUS=id:3,slots:1", "default device 0 ..."
  std::string reason;     // why not, when !available
  std::string name;       // of the selected device, when available
};
DeviceProbe probe_device();

// Owning device allocation (move-only). bytes() == 0 holds no memory.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) OPENSCI_GPU_CHECK(rt::malloc(&ptr_, bytes_));
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) static_cast<void>(rt::free(ptr_));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_ != nullptr) static_cast<void>(rt::free(ptr_));
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

  // Synchronous copies of `bytes` (default: the whole buffer) from / to host memory.
  void upload(const void* host, size_t bytes) {
    copy_checked(bytes);
    OPENSCI_GPU_CHECK(rt::memcpy_h2d(ptr_, host, bytes));
  }
  void download(void* host, size_t bytes) const {
    copy_checked(bytes);
    OPENSCI_GPU_CHECK(rt::memcpy_d2h(host, ptr_, bytes));
  }
  template <typename T>
  static DeviceBuffer from_host(const std::vector<T>& values) {
    DeviceBuffer b(values.size() * sizeof(T));
    if (!values.empty()) b.upload(values.data(), b.bytes());
    return b;
  }
  template <typename T>
  std::vector<T> to_host(size_t count) const {
    std::vector<T> v(count);
    if (count) download(v.data(), count * sizeof(T));
    return v;
  }

 private:
  void copy_checked(size_t bytes) const {
    if (bytes > bytes_)
      fail_gpu("DeviceBuffer: copy of " + std::to_string(bytes) + " bytes into a buffer of " + std::to_string(bytes_));
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Host <-> storage dtype: fp32 values as the bytes of `dtype` (bf16 rounds to nearest even,
// as opensci::f32_to_bf16), and back.
std::vector<std::byte> to_storage(DType dtype, const std::vector<float>& values);
std::vector<float> from_storage(DType dtype, const void* bytes, size_t count);

}  // namespace opensci::gpu
