// Fused gate/up LoRA expand + activation + routing-weighted combine + down-LoRA shrink, and its backward:
// declarations shared by csrc/api.cpp and expand_act_combine.cu. api.cpp has checked every input and prepared
// the layouts documented here; the caller has made the inputs' device current (CUDAGuard). No host
// synchronisation.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// Inputs of both directions, prepared by api.cpp:
//   G, U      (T, I) fp32/fp16/bf16, one dtype, stride(1) == 1; U absent for an ungated FFN
//   zg, zu    (S, Rg), (S, Ru) fp32, stride(1) == 1
//   Bg, Bu    (E, I, Rg), (E, I, Ru), stride(2) == 1 (any stride(0), stride(1): split views of B work)
//   Ad        (E, Rd, I), stride(2) == 1
//             Bg, Bu, Ad in G's dtype when expand_act_combine_reads_weights_as_is, else fp32 copies; every offset
//             into them below 2^31
//   weights   (T, K) fp32 contiguous; experts (T, K) int64 contiguous; order (S,), offsets (E+1,) int64 contiguous
//   activation: code of common.cuh::Activation
struct ExpandActCombineInputs {
  at::Tensor G;
  std::optional<at::Tensor> U;
  at::Tensor zg, Bg, zu, Bu, weights, experts, order, offsets, Ad;
  double scale;
  int activation;
  double dropout_p;
  int64_t seed;
};

// Whether the kernels read weights of these dtypes as they are (all in G's dtype); otherwise api.cpp passes fp32
// copies.
bool expand_act_combine_reads_weights_as_is(const at::Tensor& G, const at::Tensor& Bg, const at::Tensor& Bu,
                                            const at::Tensor& Ad);

// Writes hbar (T, I) in G's dtype, contiguous, and zd (S, Rd) fp32 contiguous.
void expand_act_combine_forward_launch(const ExpandActCombineInputs& in, at::Tensor& hbar, at::Tensor& zd,
                                       cudaStream_t stream);

// grad_hbar (T, I) in G's dtype with stride(1) == 1; grad_zd (S, Rd) fp32 with stride(1) == 1.
// Writes, all contiguous: dG (T, I) and dU (T, I, when U is given) in G's dtype; fp32 dzg (S, Rg), dzu (S, Ru),
// dBg (E, I, Rg), dBu (E, I, Ru), dweights (T, K), dAd (E, Rd, I).
void expand_act_combine_backward_launch(const at::Tensor& grad_hbar, const at::Tensor& grad_zd,
                                        const ExpandActCombineInputs& in, at::Tensor& dG, at::Tensor& dU,
                                        at::Tensor& dzg, at::Tensor& dBg, at::Tensor& dzu, at::Tensor& dBu,
                                        at::Tensor& dweights, at::Tensor& dAd, cudaStream_t stream);

}  // namespace mixlora
