// C ABI launchers of csrc/route/route_kernels.cuh, mirroring route_forward_launch / route_backward_launch of
// csrc/route/route.cu (see launchers.h).
#include "launchers.h"
#include "route/route_kernels.cuh"

using namespace mixlora;

extern "C" {

// logits (T, E) contiguous in dtype; writes weights (T, K) fp32 and experts (T, K) int64.
int cuda_cpu_route_forward(int dtype, const void* logits, int64_t T, int64_t E, int64_t K, float* weights,
                           int64_t* experts) {
  return cuda_cpu::guarded([&] {
    if (T == 0) {
      return;
    }
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      CUDA_CPU_LAUNCH(route_fwd_kernel<scalar_t>, cuda_cpu::ceil_div(T, kRouteBlock), kRouteBlock, 0,
                      static_cast<const scalar_t*>(logits), T, E, K, weights, experts);
    });
  });
}

// grad_weights, weights (T, K) fp32, experts (T, K) int64, contiguous; writes grad_logits (T, E) in dtype.
int cuda_cpu_route_backward(int dtype, const float* grad_weights, const float* weights, const int64_t* experts,
                            int64_t T, int64_t K, int64_t E, void* grad_logits) {
  return cuda_cpu::guarded([&] {
    if (T == 0) {
      return;
    }
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      CUDA_CPU_LAUNCH(route_bwd_kernel<scalar_t>, cuda_cpu::ceil_div(T, kRouteBlock), kRouteBlock, 0,
                      grad_weights, weights, experts, T, K, E, static_cast<scalar_t*>(grad_logits));
    });
  });
}

}  // extern "C"
