// Routing-weighted down-LoRA expand y_t = s sum_k w_j B_e zd_j and its backward: declarations shared by
// csrc/api.cpp and lora_expand_combine.cu. api.cpp has checked every input and prepared the layouts documented
// here; the caller has made the inputs' device current (CUDAGuard). No host synchronisation.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// zd (S, R) fp32 with stride(1) == 1; B (E, H, R) fp32/fp16/bf16 (read as it is) with stride(2) == 1; weights
// (T, K) fp32 contiguous;
// experts (T, K) int64 contiguous. Writes y (T, H) fp32 contiguous.
void lora_expand_combine_forward_launch(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                        const at::Tensor& experts, double scale, at::Tensor& y,
                                        cudaStream_t stream);

// grad_y (T, H) fp32/fp16/bf16 with stride(1) == 1; B in grad_y's dtype, fp32, or any when grad_y is fp32; the
// rest as above plus order (S,), offsets (E+1,) int64 contiguous. Writes dzd (S, R), dB (E, H, R) and dweights (T, K), all fp32 contiguous.
void lora_expand_combine_backward_launch(const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B,
                                         const at::Tensor& weights, const at::Tensor& experts,
                                         const at::Tensor& order, const at::Tensor& offsets, double scale,
                                         at::Tensor& dzd, at::Tensor& dB, at::Tensor& dweights,
                                         cudaStream_t stream);

}  // namespace mixlora
