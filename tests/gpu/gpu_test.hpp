// What every GPU op test shares: the device check (exit 77 = CTest "not run", with the runtime's
// reason), the seed (printed; OPENSCI_TEST_SEED overrides), guarded device buffers that catch
// out-of-bounds writes, the error metric and the per-dtype epsilon the tolerances are stated in.
//
// Metric: relative norm ||gpu - ref||_2 / ||ref||_2 against the CPU golden op (double) run on the
// very same (storage-rounded) inputs; a case passes when it is <= its tolerance, a multiple of
// the storage dtype's machine epsilon with the reason beside it.
#pragma once

#include <fmt/core.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "opensci/gpu/device.hpp"
#include "opensci/gpu/ops.hpp"
#include "opensci/safetensors.hpp"

namespace opensci::gpu::test {

inline constexpr int kSkip = 77;  // CTest SKIP_RETURN_CODE

// Machine epsilon (spacing of 1.0): fp32 2^-23, bf16 2^-7. The unit roundoff is eps / 2.
inline double eps_of(DType dtype) { return dtype == DType::F32 ? 0x1p-23 : 0x1p-7; }

struct Tolerance {
  double eps_multiple;
  const char* reason;
};

class Suite {
 public:
  explicit Suite(const char* name) : name_(name) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every line reaches the CTest log, even before a crash
    const char* env = std::getenv("OPENSCI_TEST_SEED");
    seed_ = env != nullptr ? std::strtoull(env, nullptr, 10) : 20240611ULL;
    fmt::print("{}: seed {} (set OPENSCI_TEST_SEED to reproduce another run)\n", name_, seed_);
  }

  // Returns kSkip with the reason printed when there is no device: CTest shows "Not Run".
  int skip_without_device() const {
    DeviceProbe probe;
    try {
      probe = probe_device();
    } catch (const std::exception& e) {  // a malformed CTest GPU allocation: a failure, not a skip
      fmt::print("FAIL {}: {}\n", name_, e.what());
      return 1;
    }
    if (!probe.available) {
      fmt::print("SKIP {}: {}\n", name_, probe.reason);
      return kSkip;
    }
    fmt::print("{}: {} device {} '{}' ({} visible; {})\n", name_, rt::kPlatform, probe.device, probe.name, probe.count,
               probe.selection);
    return 0;
  }

  uint64_t seed() const { return seed_; }
  std::mt19937_64 rng(uint64_t salt) const { return std::mt19937_64(seed_ ^ (salt * 0x9e3779b97f4a7c15ULL)); }

  // Records one comparison; prints it either way.
  bool check(const std::string& case_name, DType dtype, double rel_err, const Tolerance& tol) {
    const double limit = tol.eps_multiple * eps_of(dtype);
    const bool ok = std::isfinite(rel_err) && rel_err <= limit;
    fmt::print("{} {:<58} {} rel err {:.3e} <= {:.3e} ({:.4g} eps: {})\n", ok ? "ok  " : "FAIL", case_name,
               dtype_name(dtype), rel_err, limit, tol.eps_multiple, tol.reason);
    failures_ += ok ? 0 : 1;
    ++cases_;
    return ok;
  }
  bool expect(bool ok, const std::string& what) {
    if (!ok) fmt::print("FAIL {}\n", what);
    failures_ += ok ? 0 : 1;
    ++cases_;
    return ok;
  }

  int finish() const {
    fmt::print("{}: {} checks, {} failed (seed {})\n", name_, cases_, failures_, seed_);
    if (cases_ == 0) {
      fmt::print("FAIL {}: no checks ran\n", name_);
      return 1;
    }
    return failures_ == 0 ? 0 : 1;
  }

 private:
  std::string name_;
  uint64_t seed_ = 0;
  int cases_ = 0, failures_ = 0;
};

// ||a - b|| / ||b|| in double (||a - b|| when b is all zeros).
inline double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Values ~ mean + std * N(0, 1), already rounded to the storage dtype, so the CPU reference sees
// exactly what the GPU sees.
inline std::vector<float> random_values(std::mt19937_64& rng, size_t n, DType dtype, double mean = 0.0,
                                        double std = 1.0) {
  std::normal_distribution<double> dist(mean, std);
  std::vector<float> v(n);
  for (auto& x : v) {
    x = static_cast<float>(dist(rng));
    if (dtype == DType::BF16) x = bf16_to_f32(f32_to_bf16(x));
  }
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// A device allocation with 256-byte sentinel guards on both sides; the payload starts as 0xFF
// bytes (NaN in fp32 and bf16) unless uploaded. guards_intact() reads the guards back: a kernel
// that writes past either end of its output is caught even when the values look right. Each
// buffer has its own sentinel byte, so an overrun that copies another buffer's guard (a gather
// reading one row too far) still shows.
class GuardedBuffer {
 public:
  static constexpr size_t kGuard = 256;

  explicit GuardedBuffer(size_t bytes) : bytes_(bytes), sentinel_(next_sentinel()), buf_(bytes + 2 * kGuard) {
    std::vector<unsigned char> init(bytes + 2 * kGuard, 0xFF);
    std::memset(init.data(), sentinel_, kGuard);
    std::memset(init.data() + kGuard + bytes, sentinel_, kGuard);
    buf_.upload(init.data(), init.size());
  }
  static GuardedBuffer of_values(DType dtype, const std::vector<float>& values) {
    GuardedBuffer b(values.size() * dtype_size(dtype));
    b.upload(to_storage(dtype, values));
    return b;
  }
  template <typename T>
  static GuardedBuffer of(const std::vector<T>& values) {
    GuardedBuffer b(values.size() * sizeof(T));
    if (!values.empty()) OPENSCI_GPU_CHECK(rt::memcpy_h2d(b.data(), values.data(), b.bytes_));
    return b;
  }

  void* data() const { return static_cast<unsigned char*>(buf_.data()) + kGuard; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data());
  }
  void upload(const std::vector<std::byte>& bytes) {
    if (!bytes.empty()) OPENSCI_GPU_CHECK(rt::memcpy_h2d(data(), bytes.data(), bytes.size()));
  }
  std::vector<float> values(DType dtype) const {
    OPENSCI_GPU_CHECK(rt::device_synchronize());
    std::vector<std::byte> bytes(bytes_);
    if (bytes_) OPENSCI_GPU_CHECK(rt::memcpy_d2h(bytes.data(), data(), bytes_));
    return from_storage(dtype, bytes.data(), bytes_ / dtype_size(dtype));
  }
  template <typename T>
  std::vector<T> raw() const {
    OPENSCI_GPU_CHECK(rt::device_synchronize());
    std::vector<T> out(bytes_ / sizeof(T));
    if (bytes_) OPENSCI_GPU_CHECK(rt::memcpy_d2h(out.data(), data(), bytes_));
    return out;
  }
  bool guards_intact() const {
    OPENSCI_GPU_CHECK(rt::device_synchronize());
    std::vector<unsigned char> all(bytes_ + 2 * kGuard);
    OPENSCI_GPU_CHECK(rt::memcpy_d2h(all.data(), buf_.data(), all.size()));
    for (size_t i = 0; i < kGuard; ++i)
      if (all[i] != sentinel_ || all[kGuard + bytes_ + i] != sentinel_) return false;
    return true;
  }

 private:
  static unsigned char next_sentinel() {  // 0x21..0xDF, never 0x00 or 0xFF
    static unsigned counter = 0;
    return static_cast<unsigned char>(0x21 + (counter++ * 37) % 0xBF);
  }
  size_t bytes_;
  unsigned char sentinel_;
  DeviceBuffer buf_;
};

// Runs a test body; an exception (a failed launch, a runtime error) is a failure, not a crash.
template <typename F>
int run_suite(Suite& suite, F&& body) {
  if (const int skip = suite.skip_without_device()) return skip;
  try {
    body();
  } catch (const std::exception& e) {
    fmt::print("FAIL exception: {}\n", e.what());
    return 1;
  }
  return suite.finish();
}

}  // namespace opensci::gpu::test
