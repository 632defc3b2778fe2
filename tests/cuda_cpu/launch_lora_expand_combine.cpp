// C ABI launchers of the lora_expand_combine kernels (csrc/lora_tiles.cuh), mirroring
// lora_expand_combine_forward_launch / lora_expand_combine_backward_launch of
// csrc/lora_expand_combine/lora_expand_combine.cu (see launchers.h).
#include "launchers.h"
#include "lora_tiles.cuh"

using namespace mixlora;
using cuda_cpu::ceil_div;

extern "C" {

// zd (S, R) fp32, row stride zd_stride; B (E, H, R) in dtype code b_dtype, strides B_stride0, B_stride1; weights
// (T, K) fp32, experts (T, K) int64. Writes y (T, H) fp32. sms: the multiprocessor count the grid is sized by.
int cuda_cpu_lora_expand_combine_forward(const float* zd, int64_t zd_stride, const void* B, int b_dtype,
                                         int64_t B_stride0,
                                         int64_t B_stride1, int64_t E, int64_t H, int64_t R, const float* weights,
                                         const int64_t* experts, int64_t T, int64_t K, double scale, float* y,
                                         int64_t sms) {
  return cuda_cpu::guarded([&] {
    if (T == 0 || H == 0) {
      return;
    }
    cuda_cpu::dispatch_float_half_bf16(b_dtype, [&](auto wtag) {
      using weight_t = decltype(wtag);
      const auto p = expand_forward_args(zd, zd_stride, weights, experts, static_cast<const weight_t*>(B), B_stride0,
                                         B_stride1, E, T, K, H, R, static_cast<float>(scale), y, sms);
      dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
        auto launch = [&](auto whole) {
          CUDA_CPU_LAUNCH((token_fold_mma_kernel<weight_t, float, expand_dot_t<weight_t>, decltype(variant),
                                                 decltype(whole)::value>),
                          token_fold_grid(T, H, p.plan), kBlock, p.plan.smem, p);
        };
        p.plan.whole ? launch(std::true_type{}) : launch(std::false_type{});
      });
    });
  });
}

// grad_y (T, H) in dtype, row stride gy_stride; B in b_dtype (dtype's, fp32, or any when dtype is fp32); the rest
// as above plus order (S,), offsets (E+1,) int64.
// Writes dzd (S, R), dB (E, H, R), dweights (T, K), fp32 contiguous.
int cuda_cpu_lora_expand_combine_backward(int dtype, const void* grad_y, int64_t gy_stride, const float* zd,
                                          int64_t zd_stride, const void* B, int b_dtype, int64_t B_stride0,
                                          int64_t B_stride1,
                                          int64_t E, int64_t H, int64_t R, const float* weights,
                                          const int64_t* experts, int64_t T, int64_t K, const int64_t* order,
                                          const int64_t* offsets, double scale, float* dzd, float* dB,
                                          float* dweights) {
  return cuda_cpu::guarded([&] {
    const float s = static_cast<float>(scale);
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using gy_t = decltype(tag);
      if (T > 0) {
        cuda_cpu::dispatch_float_half_bf16(b_dtype, [&](auto wtag) {
          using weight_t = decltype(wtag);
          const auto p = expand_q_args(static_cast<const gy_t*>(grad_y), gy_stride, zd, zd_stride,
                                       static_cast<const weight_t*>(B), B_stride0, B_stride1, weights, order, offsets,
                                       E, T * K, K, H, R, s, dzd, dweights);
          dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
            using dot_t = expand_dot_t<weight_t>;
            CUDA_CPU_LAUNCH((slot_rank_mma_kernel<gy_t, weight_t, dot_t, decltype(variant)>),
                            slot_rank_grid(T * K, E, 1), kBlock, (slot_rank_smem_bytes<gy_t, weight_t, dot_t>()), p);
          });
        });
      }
      if (E > 0 && H > 0 && R > 0) {
        const auto p = expand_dB_args(static_cast<const gy_t*>(grad_y), gy_stride, zd, zd_stride, weights, order,
                                      offsets, T * K, K, H, R, s, dB);
        cuda_cpu::dispatch_float_half_bf16(b_dtype, [&](auto wtag) {
          using dot_t = expand_dot_t<decltype(wtag)>;
          dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
            CUDA_CPU_LAUNCH((weight_grad_mma_kernel<gy_t, dot_t, decltype(variant)>), weight_grad_grid(H, E, R),
                            kBlock, (weight_grad_smem_bytes<gy_t, dot_t>()), p);
          });
        });
      }
    });
  });
}

}  // extern "C"
