// Top-k routing (docs/algorithm.md §1) and its backward. Semantics: mixlora_kernels/ops/route.py.
//   p = softmax(logits) in fp32;  (w, e) = topk(p, K) in descending p;  w <- w / sum_k w
// One thread per token: E is small (8-64 experts), the row is a few hundred bytes, and the whole op moves T*E
// inputs and 2*T*K outputs, so a warp per token would only add shuffles. The K selections rescan the row
// (O(K*E) exp per token): cheaper than keeping E probabilities per thread in local memory.
// Ties: among equal probabilities the lower expert index comes first (torch.topk does not specify an order);
// NaN ranks above every number, so a row with a NaN logit gets experts 0..K-1 with NaN weights (as the reference).
// Backward: the renormalised weights are a softmax over the chosen logits, so
//   d logit_{e_k} = w_k (g_k - sum_k' w_k' g_k'), every other logit gets 0;
// written by the token's own thread (duplicate ids would add up, as scatter_add does), no atomics.
// Expert ids read by the backward are checked by a device assertion (see csrc/lora_shrink/lora_shrink.cu).

#include "route/route.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "route/route_kernels.cuh"

namespace mixlora {
namespace {

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
