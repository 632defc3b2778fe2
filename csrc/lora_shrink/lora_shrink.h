// Grouped LoRA shrink z_j = A_e drop_j(x_t) and its backward: declarations shared by csrc/api.cpp and
// lora_shrink.cu. api.cpp has checked every input and prepared the layouts documented here; the caller has made
// the inputs' device current (CUDAGuard). No host synchronisation.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// x (T, H) fp32/fp16/bf16 with stride(1) == 1; A (E, R, H) in x's dtype or fp32 with stride(2) == 1; order (S,)
// and offsets (E+1,) int64 contiguous; K = S / T. Writes z (S, R) fp32 contiguous.
void lora_shrink_forward_launch(const at::Tensor& x, const at::Tensor& A, const at::Tensor& order,
                                const at::Tensor& offsets, int64_t K, double dropout_p, int64_t seed, at::Tensor& z,
                                cudaStream_t stream);

// grad_z (S, R) fp32 with stride(1) == 1; x, A, order, offsets as above; experts (T, K) int64 contiguous.
// Writes dx (T, H) in x's dtype, contiguous, and dA (E, R, H) fp32 contiguous.
void lora_shrink_backward_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& A,
                                 const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                 double dropout_p, int64_t seed, at::Tensor& dx, at::Tensor& dA,
                                 cudaStream_t stream);

}  // namespace mixlora
