// Mixture-of-experts routing and expert dispatch (gather / weighted scatter-add).
// see ops.hpp: moe_route(), moe_bucket(), gather_rows(), scatter_add_weighted()
#include "kernel_common.hpp"

namespace opensci::gpu {
namespace {

// One thread per token: softmax over the experts in fp32 (transformers: F.softmax(router_logits,
// dtype=torch.float)), then k passes of "largest after the previous pick" in the order
// (probability descending, expert index ascending), which is the CPU reference's stable sort.
template <typename T>
OPENSCI_GLOBAL void moe_route_kernel(const T* logits, int32_t* topk_expert, float* topk_weight, int64_t tokens,
                                     int64_t experts, int64_t k, bool renormalize) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T* row = logits + t * experts;
    float mx = -INFINITY;
    for (int64_t e = 0; e < experts; ++e) mx = fmaxf(mx, to_float(row[e]));
    float sum = 0.0f;
    for (int64_t e = 0; e < experts; ++e) sum += expf(to_float(row[e]) - mx);
    float prev_p = INFINITY;
    int64_t prev_e = -1;
    float top_sum = 0.0f;
    for (int64_t slot = 0; slot < k; ++slot) {
      float best_p = -1.0f;
      int64_t best_e = -1;
      for (int64_t e = 0; e < experts; ++e) {
        const float p = expf(to_float(row[e]) - mx) / sum;
        const bool after_prev = p < prev_p || (p == prev_p && e > prev_e);
        if (after_prev && p > best_p) {  // strict: ties keep the lower index
          best_p = p;
          best_e = e;
        }
      }
      topk_expert[t * k + slot] = static_cast<int32_t>(best_e);
      topk_weight[t * k + slot] = best_p;
      top_sum += best_p;
      prev_p = best_p;
      prev_e = best_e;
    }
    if (renormalize)
      for (int64_t slot = 0; slot < k; ++slot) topk_weight[t * k + slot] /= top_sum;
  }
}

// One block. Pass 1: thread e counts bucket e; pass 2: prefix sum; pass 3: thread e lists its
// (token, slot) pairs in token order. O(experts * tokens * k) work: a reference, not a router.
OPENSCI_GLOBAL void moe_bucket_kernel(const int32_t* topk_expert, int64_t tokens, int64_t k, int64_t experts,
                                      int32_t* offsets, int32_t* token_of, int32_t* slot_of) {
  const int64_t pairs = tokens * k;
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int32_t count = 0;
    for (int64_t i = 0; i < pairs; ++i) count += topk_expert[i] == e ? 1 : 0;
    offsets[e + 1] = count;
  }
  sync_block();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
  }
  sync_block();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int32_t at = offsets[e];
    for (int64_t i = 0; i < pairs; ++i)
      if (topk_expert[i] == e) {
        token_of[at] = static_cast<int32_t>(i / k);
        slot_of[at] = static_cast<int32_t>(i % k);
        ++at;
      }
  }
}

template <typename T>
OPENSCI_GLOBAL void gather_rows_kernel(T* out, const T* x, const int32_t* rows, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x)
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = x[rows[i] * cols + c];
}

template <typename T>
OPENSCI_GLOBAL void scatter_add_weighted_kernel(T* out, const T* y, const int32_t* token_of, const int32_t* slot_of,
                                                const float* topk_weight, int64_t k, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t t = token_of[i];
    const float w = round_to<T>(topk_weight[t * k + slot_of[i]]);  // PP: routing_weights.to(dtype)
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float weighted = round_to<T>(to_float(y[i * cols + c]) * w);          // PP: expert_out * weight
      out[t * cols + c] = from_float<T>(to_float(out[t * cols + c]) + weighted);  // PP: index_add_
    }
  }
}

}  // namespace

void moe_route(DType dtype, const void* logits, int32_t* topk_expert, float* topk_weight, int64_t tokens,
               int64_t experts, int64_t k, bool renormalize, Stream stream) {
  detail::require(k > 0 && k <= experts, "moe_route",
                  "top-k " + std::to_string(k) + " must be in [1, experts = " + std::to_string(experts) + "]");
  if (tokens == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &moe_route_kernel<T>;
    OPENSCI_LAUNCH(kernel, detail::grid_for(tokens, 64), dim3(64), 0, stream, static_cast<const T*>(logits),
                   topk_expert, topk_weight, tokens, experts, k, renormalize);
  });
  OPENSCI_GPU_CHECK_LAUNCH("moe_route_kernel");
}

void moe_bucket(const int32_t* topk_expert, int64_t tokens, int64_t k, int64_t experts, int32_t* offsets,
                int32_t* token_of, int32_t* slot_of, Stream stream) {
  detail::require(tokens * k <= INT32_MAX, "moe_bucket", "too many (token, slot) pairs for int32 indices");
  auto* kernel = &moe_bucket_kernel;
  OPENSCI_LAUNCH(kernel, dim3(1), dim3(detail::kThreads), 0, stream, topk_expert, tokens, k, experts, offsets, token_of,
                 slot_of);
  OPENSCI_GPU_CHECK_LAUNCH("moe_bucket_kernel");
}

void gather_rows(DType dtype, void* out, const void* x, const int32_t* rows, int64_t n, int64_t cols, Stream stream) {
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &gather_rows_kernel<T>;
    OPENSCI_LAUNCH(kernel, dim3(static_cast<unsigned>(std::min<int64_t>(n, 65535))), dim3(detail::kThreads), 0, stream,
                   static_cast<T*>(out), static_cast<const T*>(x), rows, n, cols);
  });
  OPENSCI_GPU_CHECK_LAUNCH("gather_rows_kernel");
}

void scatter_add_weighted(DType dtype, void* out, const void* y, const int32_t* token_of, const int32_t* slot_of,
                          const float* topk_weight, int64_t k, int64_t n, int64_t cols, Stream stream) {
  if (n == 0) return;
  detail::with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = &scatter_add_weighted_kernel<T>;
    OPENSCI_LAUNCH(kernel, dim3(static_cast<unsigned>(std::min<int64_t>(n, 65535))), dim3(detail::kThreads), 0, stream,
                   static_cast<T*>(out), static_cast<const T*>(y), token_of, slot_of, topk_weight, k, n, cols);
  });
  OPENSCI_GPU_CHECK_LAUNCH("scatter_add_weighted_kernel");
}

}  // namespace opensci::gpu
