// Router softmax + top-k + renormalisation and its backward: declarations shared by csrc/api.cpp and route.cu.
// api.cpp has checked every input and prepared the layouts documented here; the caller has made the inputs'
// device current (CUDAGuard). No host synchronisation.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// logits (T, E) fp32/fp16/bf16 contiguous. Writes weights (T, K) fp32 and experts (T, K) int64, contiguous.
void route_forward_launch(const at::Tensor& logits, int64_t top_k, at::Tensor& weights, at::Tensor& experts,
                          cudaStream_t stream);

// grad_weights, weights (T, K) fp32 contiguous; experts (T, K) int64 contiguous. Writes grad_logits (T, E),
// contiguous, fp32/fp16/bf16.
void route_backward_launch(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& experts,
                           at::Tensor& grad_logits, cudaStream_t stream);

}  // namespace mixlora
