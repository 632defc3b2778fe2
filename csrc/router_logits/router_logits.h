// Router logits x W_gᵀ and their backward: declarations shared by csrc/api.cpp and router_logits.cu. api.cpp has
// checked every input and prepared the layouts documented here; the caller has made the inputs' device current
// (CUDAGuard). No host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// The most tokens the launches serve: the dx grid has a row of blocks per 128 rows (kRouterDxRows), at most 65535.
constexpr int64_t kRouterMaxTokens = int64_t{65535} * 128;

// x (T, H) fp32/fp16/bf16 with unit inner stride; weight (E, H) fp32 with unit inner stride. Writes logits (T, E)
// fp32, contiguous.
void router_logits_forward_launch(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits,
                                  cudaStream_t stream);

// grad (T, E) fp32 contiguous; x, weight as in the forward. Writes dx (T, H) contiguous in x's dtype and dw (E, H)
// fp32 contiguous.
void router_logits_backward_launch(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   at::Tensor& dx, at::Tensor& dw, cudaStream_t stream);

}  // namespace mixlora
