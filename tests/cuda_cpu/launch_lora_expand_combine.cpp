// C ABI launchers of csrc/lora_expand_combine/lora_expand_combine_kernels.cuh, mirroring
// lora_expand_combine_forward_launch / lora_expand_combine_backward_launch of
// csrc/lora_expand_combine/lora_expand_combine.cu (see launchers.h).
#include "launchers.h"
#include "lora_expand_combine/lora_expand_combine_kernels.cuh"

using namespace mixlora;
using cuda_cpu::ceil_div;

extern "C" {

// zd (S, R) fp32, row stride zd_stride; B (E, H, R) in dtype code b_dtype, strides B_stride0, B_stride1; weights
// (T, K) fp32, experts (T, K) int64. Writes y (T, H) fp32.
int cuda_cpu_lora_expand_combine_forward(const float* zd, int64_t zd_stride, const void* B, int b_dtype,
                                         int64_t B_stride0,
                                         int64_t B_stride1, int64_t E, int64_t H, int64_t R, const float* weights,
                                         const int64_t* experts, int64_t T, int64_t K, double scale, float* y) {
  return cuda_cpu::guarded([&] {
    if (T == 0 || H == 0) {
      return;
    }
    const size_t smem = static_cast<size_t>(K * R) * sizeof(float);
    if (smem > 48 * 1024) {
      throw cuda_cpu::Error("lora_expand_combine: K * R floats of zd per token exceed 48 KiB");
    }
    cuda_cpu::dispatch_float_half_bf16(b_dtype, [&](auto wtag) {
      using weight_t = decltype(wtag);
      CUDA_CPU_LAUNCH(lora_expand_combine_fwd_kernel<weight_t>, static_cast<unsigned int>(T), kBlock, smem, zd,
                      zd_stride, static_cast<const weight_t*>(B), B_stride0, B_stride1, weights, experts, E, K, H, R,
                      static_cast<float>(scale), y);
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
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      if (T > 0) {
        const size_t smem = static_cast<size_t>(R) * sizeof(float);
        if (smem + (kWarps + 1) * kRanksPerPass * sizeof(float) > 48 * 1024) {
          throw cuda_cpu::Error("lora_expand_combine_backward: rank R exceeds what the kernel keeps in shared memory");
        }
        cuda_cpu::dispatch_float_half_bf16(b_dtype, [&](auto wtag) {
          using weight_t = decltype(wtag);
          CUDA_CPU_LAUNCH((lora_expand_combine_bwd_q_kernel<scalar_t, weight_t>), static_cast<unsigned int>(T),
                          kBlock, smem, static_cast<const scalar_t*>(grad_y), gy_stride, zd, zd_stride,
                          static_cast<const weight_t*>(B), B_stride0, B_stride1, weights, experts, E, K, H, R,
                          static_cast<float>(scale), dzd, dweights);
        });
      }
      if (E > 0 && H > 0 && R > 0) {
        const dim3 grid(ceil_div(H, kTileM), static_cast<unsigned int>(E), ceil_div(R, kTileN));
        CUDA_CPU_LAUNCH(lora_expand_combine_bwd_dB_kernel<scalar_t>, grid, kBlock, 0,
                        static_cast<const scalar_t*>(grad_y), gy_stride, zd, zd_stride, weights, order, offsets,
                        T * K, K, H, R, static_cast<float>(scale), dB);
      }
    });
  });
}

}  // extern "C"
