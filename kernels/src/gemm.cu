// GEMM for the linear layers: the vendor BLAS where present, our tiled kernel otherwise.
// see gemm.hpp
#include <climits>

#include "kernel_common.hpp"
#include "opensci/gpu/gemm.hpp"

#if defined(OPENSCI_GPU_CUDA) && defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
#include <cublas_v2.h>
#elif defined(OPENSCI_GPU_HIP) && defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
#if __has_include(<rocblas/rocblas.h>)
#include <rocblas/rocblas.h>
#else
#include <rocblas.h>
#endif
#endif

namespace opensci::gpu {
namespace {

// 64x64 output tile per block, k-steps of 16, 256 threads each computing a 4x4 sub-tile with a
// stride of 16 (coalesced stores, conflict-free shared reads).
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kPad = 4;
constexpr int kGemmThreads = 256;
static_assert(kTileM == kTileN, "one loader loop fills both tiles");
constexpr size_t kGemmShared = sizeof(float) * kTileK * ((kTileM + kPad) + (kTileN + kPad));

// c[M, N] = a[M, K] . b[N, K]^T + beta * c
template <typename T>
OPENSCI_GLOBAL void OPENSCI_LAUNCH_BOUNDS(kGemmThreads)
    gemm_nt_kernel(T* c, const T* a, const T* b, int64_t M, int64_t N, int64_t K, float beta) {
  OPENSCI_DYNAMIC_SHARED(shared);
  float* as = reinterpret_cast<float*>(shared);  // [kTileK][kTileM + kPad], k-major
  float* bs = as + kTileK * (kTileM + kPad);     // [kTileK][kTileN + kPad]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  float acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    for (int idx = tid; idx < kTileM * kTileK; idx += kGemmThreads) {
      const int r = idx / kTileK, kk = idx % kTileK;  // k fastest: coalesced global reads
      const int64_t gm = m0 + r, gn = n0 + r, gk = k0 + kk;
      as[kk * (kTileM + kPad) + r] = gm < M && gk < K ? to_float(a[gm * K + gk]) : 0.0f;
      bs[kk * (kTileN + kPad) + r] = gn < N && gk < K ? to_float(b[gn * K + gk]) : 0.0f;
    }
    sync_block();
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
      for (int i = 0; i < 4; ++i) av[i] = as[kk * (kTileM + kPad) + ty + 16 * i];
      for (int j = 0; j < 4; ++j) bv[j] = bs[kk * (kTileN + kPad) + tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    sync_block();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
      if (gm < M && gn < N) {
        float value = acc[i][j];
        if (beta != 0.0f) value += beta * to_float(c[gm * N + gn]);  // beta = 0: c is not read
        c[gm * N + gn] = from_float<T>(value);
      }
    }
}

void check_gemm_shape(int64_t rows, int64_t in, int64_t outf) {
  detail::require(rows >= 0 && in > 0 && outf > 0, "gemm",
                  "shape rows " + std::to_string(rows) + ", in " + std::to_string(in) + ", out " +
                      std::to_string(outf) + " is not a matrix product");
  detail::require((outf + kTileN - 1) / kTileN <= INT_MAX && (rows + kTileM - 1) / kTileM <= 65535, "gemm",
                  "too many rows for one launch: " + std::to_string(rows));
}

}  // namespace

void gemm_tiled(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t in, int64_t outf,
                float beta, Stream stream) {
  check_gemm_shape(rows, in, outf);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>((outf + kTileN - 1) / kTileN),
                  static_cast<unsigned>((rows + kTileM - 1) / kTileM));
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &gemm_nt_kernel<T>;
    OPENSCI_LAUNCH(kernel, grid, dim3(kGemmThreads), kGemmShared, stream, static_cast<T*>(out),
                   static_cast<const T*>(x), static_cast<const T*>(w), rows, outf, in, beta);
  });
  OPENSCI_GPU_CHECK_LAUNCH("gemm_nt_kernel");
}

#if defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
namespace {
#if defined(OPENSCI_GPU_CUDA)
void check_blas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    fail_gpu(std::string("cuBLAS call ") + call + " failed: " + cublasGetStatusName(status) + " (" +
             std::to_string(static_cast<int>(status)) + "): " + cublasGetStatusString(status));
}
#else
void check_blas(rocblas_status status, const char* call) {
  if (status != rocblas_status_success)
    fail_gpu(std::string("rocBLAS call ") + call + " failed: " + rocblas_status_to_string(status) + " (" +
             std::to_string(static_cast<int>(status)) + ")");
}
#endif
}  // namespace
#endif

bool Gemm::vendor_available() {
#if defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
  return true;
#else
  return false;
#endif
}

Gemm::Gemm(GemmBackend requested) {
  if (requested == GemmBackend::Vendor && !vendor_available())
    fail_gpu(std::string("gemm: the vendor BLAS was not found when this ") + rt::kPlatform +
             " build was configured (see kernels/README.md); use the tiled GEMM");
  backend_ = requested == GemmBackend::Tiled || !vendor_available() ? GemmBackend::Tiled : GemmBackend::Vendor;
#if defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
  if (backend_ == GemmBackend::Vendor) {
#if defined(OPENSCI_GPU_CUDA)
    cublasHandle_t h = nullptr;
    check_blas(cublasCreate(&h), "cublasCreate");
    handle_ = h;
    check_blas(cublasSetMathMode(h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                                              CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
               "cublasSetMathMode");
#else
    rocblas_handle h = nullptr;
    check_blas(rocblas_create_handle(&h), "rocblas_create_handle");
    handle_ = h;
#endif
  }
#endif
}

Gemm::~Gemm() {
#if defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
  if (handle_ != nullptr) {
#if defined(OPENSCI_GPU_CUDA)
    cublasDestroy(static_cast<cublasHandle_t>(handle_));
#else
    rocblas_destroy_handle(static_cast<rocblas_handle>(handle_));
#endif
  }
#endif
}

const char* Gemm::name() const {
  if (backend_ == GemmBackend::Tiled) return "tiled";
#if defined(OPENSCI_GPU_CUDA)
  return "cuBLAS";
#else
  return "rocBLAS";
#endif
}

void Gemm::linear(DType dtype, void* out, const void* x, const void* w, int64_t rows, int64_t in, int64_t outf,
                  float beta, Stream stream) const {
  check_gemm_shape(rows, in, outf);
  if (rows == 0) return;
  if (backend_ == GemmBackend::Tiled) {
    gemm_tiled(dtype, out, x, w, rows, in, outf, beta, stream);
    return;
  }
#if defined(OPENSCI_GPU_HAVE_VENDOR_BLAS)
  detail::require(rows <= INT_MAX && in <= INT_MAX && outf <= INT_MAX, "gemm", "dimensions exceed the BLAS int range");
  const float alpha = 1.0f;
  // Row-major out[rows, outf] is column-major out^T [outf, rows] = w^T' . x' with w read
  // transposed: (m, n, k) = (outf, rows, in), lda = ldb = in, ldc = outf.
  const int m = static_cast<int>(outf), n = static_cast<int>(rows), kk = static_cast<int>(in);
#if defined(OPENSCI_GPU_CUDA)
  auto h = static_cast<cublasHandle_t>(handle_);
  check_blas(cublasSetStream(h, stream), "cublasSetStream");
  const cudaDataType_t type = dtype == DType::F32 ? CUDA_R_32F : CUDA_R_16BF;
  check_blas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, kk, &alpha, w, type, kk, x, type, kk, &beta, out, type, m,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
             "cublasGemmEx");
#else
  auto h = static_cast<rocblas_handle>(handle_);
  check_blas(rocblas_set_stream(h, stream), "rocblas_set_stream");
  const rocblas_datatype type = dtype == DType::F32 ? rocblas_datatype_f32_r : rocblas_datatype_bf16_r;
  check_blas(
      rocblas_gemm_ex(h, rocblas_operation_transpose, rocblas_operation_none, m, n, kk, &alpha, w, type, kk, x, type,
                      kk, &beta, out, type, m, out, type, m, rocblas_datatype_f32_r, rocblas_gemm_algo_standard, 0, 0),
      "rocblas_gemm_ex");
#endif
#endif
}

}  // namespace opensci::gpu
