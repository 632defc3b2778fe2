// Top-k routing (docs: mixlora.md §1) and its backward. Semantics: mixlora_kernels/ops/route.py.
//   p = softmax(logits) in fp32;  (w, e) = topk(p, K) in descending p;  w <- w / sum_k w
// One thread per token: E is small (8-64 experts), the row is a few hundred bytes, and the whole op moves T*E
// inputs and 2*T*K outputs, so a warp per token would only add shuffles. The K selections rescan the row
// (O(K*E) exp per token): cheaper than keeping E probabilities per thread in local memory.
// Ties: among equal probabilities the lower expert index comes first (torch.topk does not specify an order).
// Backward: the renormalised weights are a softmax over the chosen logits, so
//   d logit_{e_k} = w_k (g_k - sum_k' w_k' g_k'), every other logit gets 0;
// written by the token's own thread (duplicate ids would add up, as scatter_add does), no atomics.
// Expert ids read by the backward are checked by a device assertion (see csrc/lora_shrink/lora_shrink.cu).

#include "route/route.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kRouteBlock = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteBlock)
route_fwd_kernel(const scalar_t* __restrict__ logits, int64_t T, int64_t E, int64_t K, float* __restrict__ weights,
                 int64_t* __restrict__ experts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) {
    return;
  }
  const scalar_t* row = logits + t * E;
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    mx = fmaxf(mx, static_cast<float>(row[e]));
  }
  float denom = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    denom += expf(static_cast<float>(row[e]) - mx);
  }
  // k-th pick: the largest p strictly after the previous pick in the order (p descending, index ascending).
  float prev_p = INFINITY;
  int64_t prev_e = -1;
  float total = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float best_p = -1.0f;
    int64_t best_e = -1;
    for (int64_t e = 0; e < E; ++e) {
      const float p = expf(static_cast<float>(row[e]) - mx) / denom;
      const bool after_prev = p < prev_p || (p == prev_p && e > prev_e);
      if (after_prev && p > best_p) {
        best_p = p;
        best_e = e;
      }
    }
    weights[t * K + k] = best_p;
    experts[t * K + k] = best_e;
    total += best_p;
    prev_p = best_p;
    prev_e = best_e;
  }
  for (int64_t k = 0; k < K; ++k) {
    weights[t * K + k] /= total;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteBlock)
route_bwd_kernel(const float* __restrict__ grad_weights, const float* __restrict__ weights,
                 const int64_t* __restrict__ experts, int64_t T, int64_t K, int64_t E,
                 scalar_t* __restrict__ grad_logits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) {
    return;
  }
  float dot = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    dot += weights[t * K + k] * grad_weights[t * K + k];
  }
  scalar_t* out = grad_logits + t * E;
  for (int64_t e = 0; e < E; ++e) {
    out[e] = static_cast<scalar_t>(0.0f);
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = experts[t * K + k];
    CUDA_KERNEL_ASSERT(e >= 0 && e < E && "route_backward: expert id out of range [0, num_experts)");
    const float g = weights[t * K + k] * (grad_weights[t * K + k] - dot);
    out[e] = static_cast<scalar_t>(static_cast<float>(out[e]) + g);
  }
}

unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>((n + kRouteBlock - 1) / kRouteBlock);
}

}  // namespace

void route_forward_launch(const at::Tensor& logits, int64_t top_k, at::Tensor& weights, at::Tensor& experts,
                          cudaStream_t stream) {
  const int64_t T = logits.size(0);
  if (T == 0) {
    return;
  }
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(logits.scalar_type(), "route", [&] {
    route_fwd_kernel<scalar_t><<<num_blocks(T), kRouteBlock, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), T, logits.size(1), top_k, weights.mutable_data_ptr<float>(),
        experts.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void route_backward_launch(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& experts,
                           at::Tensor& grad_logits, cudaStream_t stream) {
  const int64_t T = grad_logits.size(0);
  if (T == 0) {
    return;
  }
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_logits.scalar_type(), "route_backward", [&] {
    route_bwd_kernel<scalar_t><<<num_blocks(T), kRouteBlock, 0, stream>>>(
        grad_weights.const_data_ptr<float>(), weights.const_data_ptr<float>(), experts.const_data_ptr<int64_t>(),
        T, weights.size(1), grad_logits.size(1), grad_logits.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mixlora
