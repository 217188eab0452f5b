// The linear layers' GEMM: out[rows, outf] = x[rows, in] . w[outf, in]^T + beta * out
// (nn.Linear's layout; the bias enters as out pre-filled with broadcast_rows and beta = 1, one
// rounding of acc + bias as torch's addmm does).
//   Vendor  cuBLAS (cublasGemmEx) on CUDA, rocBLAS (rocblas_gemm_ex) on ROCm when it was found
//           at configure time; fp32 accumulation; no TF32 (torch's default allow_tf32 = False);
//           reduced-precision bf16 split-K reductions disallowed, so the reference does not
//           depend on cuBLAS heuristics picking a bf16 reduction.
//   Tiled   our 64x64x16 shared-memory kernel (kernels/src/gemm.cu), fp32 accumulation, one
//           rounding on store: the fallback of a ROCm build without rocBLAS and of emulation.
#pragma once

#include <cstdint>

#include "opensci/gpu/ops.hpp"

namespace opensci::gpu {

enum class GemmBackend { Auto, Vendor, Tiled };

class Gemm {
 public:
  // Auto = Vendor when this build has it, else Tiled. Vendor without it throws.
  explicit Gemm(GemmBackend requested = GemmBackend::Auto);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  void linear(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t in, int64_t outf, float beta,
              Stream stream) const;

  GemmBackend backend() const { return backend_; }
  const char* name() const;  // "cuBLAS", "rocBLAS" or "tiled"
  static bool vendor_available();

 private:
  GemmBackend backend_ = GemmBackend::Tiled;
  [[maybe_unused]] void* handle_ = nullptr;  // cublasHandle_t / rocblas_handle; unused without a vendor BLAS
};

// The tiled kernel on its own (tests compare it with the vendor GEMM and the CPU loops).
void gemm_tiled(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t in, int64_t outf,
                float beta, Stream stream);

}  // namespace opensci::gpu
