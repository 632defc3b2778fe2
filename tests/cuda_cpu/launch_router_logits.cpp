// C ABI launchers of csrc/router_logits/router_logits_kernels.cuh, mirroring router_logits_forward_launch /
// router_logits_backward_launch of csrc/router_logits/router_logits.cu (see launchers.h).
#include <type_traits>

#include "launchers.h"
#include "router_logits/router_logits_kernels.cuh"

using namespace mixlora;

extern "C" {

// x (T, H) in dtype with row stride stride_x, W (E, H) fp32 with row stride stride_w; writes logits (T, E) fp32.
int cuda_cpu_router_logits_forward(int dtype, const void* x, int64_t stride_x, int64_t T, int64_t H, const float* W,
                                   int64_t stride_w, int64_t E, float* logits) {
  return cuda_cpu::guarded([&] {
    if (T == 0 || E == 0) {
      return;
    }
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* xp = static_cast<const scalar_t*>(x);
      const dim3 grid(cuda_cpu::ceil_div(T, kRouterFwdBlockRows), cuda_cpu::ceil_div(E, kRouterExperts));
      auto launch = [&](auto vec) {
        CUDA_CPU_LAUNCH((router_logits_fwd_kernel<scalar_t, decltype(vec)::value>), grid, kBlock, 0, xp, stride_x,
                        T, H, W, stride_w, E, logits);
      };
      router_rows_vec(xp, stride_x, H) && router_rows_vec(W, stride_w, H) ? launch(std::true_type{})
                                                                          : launch(std::false_type{});
    });
  });
}

// grad (T, E) fp32 contiguous, x and W as in the forward, part (cdiv(T, kRouterChunkT), E, H) fp32 scratch; writes
// dx (T, H) in dtype, contiguous, and dw (E, H) fp32.
int cuda_cpu_router_logits_backward(int dtype, const float* grad, const void* x, int64_t stride_x, int64_t T,
                                    int64_t H, const float* W, int64_t stride_w, int64_t E, void* dx, float* part,
                                    float* dw) {
  return cuda_cpu::guarded([&] {
    if (E == 0 || H == 0) {
      return;
    }
    const int64_t n_chunks = (T + kRouterChunkT - 1) / kRouterChunkT;
    cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* xp = static_cast<const scalar_t*>(x);
      auto* dxp = static_cast<scalar_t*>(dx);
      if (T > 0) {
        auto launch_dx = [&](auto vec) {
          CUDA_CPU_LAUNCH((router_logits_dx_kernel<scalar_t, decltype(vec)::value>),
                          dim3(cuda_cpu::ceil_div(H, kRouterCols), cuda_cpu::ceil_div(T, kRouterDxRows)), kBlock, 0,
                          grad, T, H, W, stride_w, E, dxp);
        };
        router_rows_vec(dxp, H, H) ? launch_dx(std::true_type{}) : launch_dx(std::false_type{});
        auto launch_part = [&](auto vec) {
          CUDA_CPU_LAUNCH((router_logits_dw_partial_kernel<scalar_t, decltype(vec)::value>),
                          dim3(cuda_cpu::ceil_div(H, kRouterCols), static_cast<unsigned int>(n_chunks),
                               cuda_cpu::ceil_div(E, kRouterExperts)),
                          kBlock, 0, grad, xp, stride_x, T, H, E, part);
        };
        router_rows_vec(xp, stride_x, H) && router_rows_vec(part, H, H) ? launch_part(std::true_type{})
                                                                : launch_part(std::false_type{});
      }
    });
    CUDA_CPU_LAUNCH(router_logits_dw_sum_kernel, cuda_cpu::ceil_div(E * H, kBlock), kBlock, 0, part, n_chunks, E * H,
                    dw);
  });
}

}  // extern "C"
