// C ABI launchers of the lora_shrink kernels (csrc/lora_tiles.cuh), mirroring lora_shrink_forward_launch /
// lora_shrink_backward_launch of csrc/lora_shrink/lora_shrink.cu (see launchers.h).
#include "launchers.h"
#include "lora_tiles.cuh"

using namespace mixlora;
using cuda_cpu::ceil_div;

extern "C" {

// x (T, H) in dtype, row stride x_stride; A (E, R, H) in dtype (a_fp32 = 0) or fp32 (1), strides A_stride0,
// A_stride1; order (S,), offsets (E+1,) int64. Writes z (S, R) fp32.
int cuda_cpu_lora_shrink_forward(int dtype, const void* x, int64_t x_stride, int64_t H, const void* A, int a_fp32,
                                 int64_t A_stride0, int64_t A_stride1, int64_t E, int64_t R, const int64_t* order,
                                 const int64_t* offsets, int64_t S, int64_t K, double dropout_p, int64_t seed,
                                 float* z) {
  return cuda_cpu::guarded([&] {
    if (S == 0 || R == 0 || H == 0) {
      return;
    }
    const Dropout drop = make_dropout(dropout_p, seed);
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      auto launch = [&](auto wtag) {
        using weight_t = decltype(wtag);
        const auto p = shrink_forward_args(static_cast<const scalar_t*>(x), x_stride, static_cast<const weight_t*>(A),
                                           A_stride0, A_stride1, order, offsets, E, S, K, H, R, drop, z);
        dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
          using dot_t = shrink_dot_t<scalar_t, weight_t>;
          CUDA_CPU_LAUNCH((slot_rank_mma_kernel<scalar_t, weight_t, dot_t, decltype(variant)>),
                          slot_rank_grid(S, E, ceil_div(R, kTile)), kBlock,
                          (slot_rank_smem_bytes<scalar_t, weight_t, dot_t>()), p);
        });
      };
      a_fp32 ? launch(float{}) : launch(scalar_t{});
    });
  });
}

// grad_z (S, R) fp32, row stride gz_stride; x, A, order, offsets as above; experts (T, K) int64.
// Writes dx (T, H) in dtype and dA (E, R, H) fp32. sms: the multiprocessor count the dx grid is sized by.
int cuda_cpu_lora_shrink_backward(int dtype, const float* grad_z, int64_t gz_stride, const void* x,
                                  int64_t x_stride, int64_t T, int64_t H, const void* A, int a_fp32, int64_t A_stride0,
                                  int64_t A_stride1, int64_t E, int64_t R, const int64_t* experts, int64_t K,
                                  const int64_t* order, const int64_t* offsets, double dropout_p, int64_t seed,
                                  void* dx, float* dA, int64_t sms) {
  return cuda_cpu::guarded([&] {
    const Dropout drop = make_dropout(dropout_p, seed);
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      if (T > 0 && H > 0) {
        auto launch = [&](auto wtag) {
          using weight_t = decltype(wtag);
          const auto p = shrink_dx_args(grad_z, gz_stride, static_cast<const weight_t*>(A), A_stride0, A_stride1,
                                        experts, E, T, K, H, R, drop, static_cast<scalar_t*>(dx), sms);
          dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
            auto launch_fold = [&](auto whole) {
              CUDA_CPU_LAUNCH((token_fold_mma_kernel<weight_t, scalar_t, shrink_dot_t<scalar_t, weight_t>,
                                                     decltype(variant), decltype(whole)::value>),
                              token_fold_grid(T, H, p.plan), kBlock, p.plan.smem, p);
            };
            p.plan.whole ? launch_fold(std::true_type{}) : launch_fold(std::false_type{});
          });
        };
        a_fp32 ? launch(float{}) : launch(scalar_t{});
      }
      if (E > 0 && R > 0 && H > 0) {
        const auto p = shrink_dA_args(grad_z, gz_stride, static_cast<const scalar_t*>(x), x_stride, order, offsets,
                                      T * K, K, H, R, drop, dA);
        auto launch = [&](auto wtag) {
          using dot_t = shrink_dot_t<scalar_t, decltype(wtag)>;
          dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
            CUDA_CPU_LAUNCH((weight_grad_mma_kernel<scalar_t, dot_t, decltype(variant)>), weight_grad_grid(H, E, R),
                            kBlock, (weight_grad_smem_bytes<scalar_t, dot_t>()), p);
          });
        };
        a_fp32 ? launch(float{}) : launch(scalar_t{});
      }
    });
  });
}

}  // extern "C"
