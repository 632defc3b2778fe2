// Router logits (docs/algorithm.md §1) and their backward. Semantics: mixlora_kernels/ops/router_logits.py.
//   logits = x W_gᵀ        dx = g W_g        dW_g = gᵀ x
// Exact fp32 on SIMT FMA units, like the Triton kernels (mixlora_kernels/triton/router_logits.py): x is read once
// per launch in its own dtype and widened in registers, the fp32 router weight is multiplied as it is (no tf32,
// no bf16 rounding of it, no tensor cores), every sum accumulates in fp32. E is small (8 in the model): a thread
// keeps one fp32 value per expert of a group of kRouterExperts = 8 for each of its 8 columns, so an element of x or
// dx feeds 8 FMAs.
//
// Launches (T tokens, H hidden, E experts; groups of 8 experts; 256-column steps, 256 threads per block):
//   forward   router_logits_fwd_kernel         grid (cdiv(T, 32), cdiv(E, 8))        x, W (from shared memory)
//   backward  router_logits_dx_kernel          grid (cdiv(H, 256), cdiv(T, 128))     grad, W (in registers)
//             router_logits_dw_partial_kernel  grid (cdiv(H, 256), cdiv(T, 256), cdiv(E, 8))  grad, x
//             router_logits_dw_sum_kernel      grid cdiv(E H, 256)                   the partials in chunk order
// HBM bytes: about 2 per (T, H) element of 16-bit x in the forward and 2 + 2 in the backward (dx written, x read),
// against the torch path's 30 (x.to(fp32) copies, an fp32 dx); the dW partials add 4 E / 256 bytes per element
// each way. dW is deterministic: T is cut into fixed chunks of kRouterChunkT rows, a block sums its chunk in a
// fixed order, and the last launch adds the partials in chunk order. No atomics.

#include "router_logits/router_logits.h"

#include <type_traits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "router_logits/router_logits_kernels.cuh"

namespace mixlora {
namespace {

static_assert(kRouterMaxTokens <= int64_t{65535} * kRouterDxRows && kRouterChunkT >= kRouterDxRows,
              "the dx and dW grids' y extents stay within 65535 for T <= kRouterMaxTokens");

unsigned int cdiv(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace

void router_logits_forward_launch(const at::Tensor& x, const at::Tensor& weight, at::Tensor& logits,
                                  cudaStream_t stream) {
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  if (T == 0 || E == 0) {
    return;
  }
  const dim3 grid(cdiv(T, kRouterFwdBlockRows), cdiv(E, kRouterExperts));
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "router_logits", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const float* wp = weight.const_data_ptr<float>();
    auto launch = [&](auto vec) {
      router_logits_fwd_kernel<scalar_t, decltype(vec)::value><<<grid, kBlock, 0, stream>>>(
          xp, x.stride(0), T, H, wp, weight.stride(0), E, logits.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    router_rows_vec(xp, x.stride(0), H) && router_rows_vec(wp, weight.stride(0), H) ? launch(std::true_type{})
                                                                                    : launch(std::false_type{});
  });
}

void router_logits_backward_launch(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   at::Tensor& dx, at::Tensor& dw, cudaStream_t stream) {
  const int64_t T = x.size(0), H = x.size(1), E = weight.size(0);
  if (E == 0 || H == 0) {
    return;
  }
  const int64_t n_chunks = (T + kRouterChunkT - 1) / kRouterChunkT;
  at::Tensor part = at::empty({n_chunks, E, H}, weight.options().dtype(at::kFloat));
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "router_logits_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    float* pp = part.mutable_data_ptr<float>();
    if (T > 0) {
      auto launch_dx = [&](auto vec) {
        router_logits_dx_kernel<scalar_t, decltype(vec)::value>
            <<<dim3(cdiv(H, kRouterCols), cdiv(T, kRouterDxRows)), kBlock, 0, stream>>>(
                grad.const_data_ptr<float>(), T, H, weight.const_data_ptr<float>(), weight.stride(0), E, dxp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      router_rows_vec(dxp, H, H) ? launch_dx(std::true_type{}) : launch_dx(std::false_type{});
      auto launch_part = [&](auto vec) {
        router_logits_dw_partial_kernel<scalar_t, decltype(vec)::value>
            <<<dim3(cdiv(H, kRouterCols), static_cast<unsigned int>(n_chunks), cdiv(E, kRouterExperts)), kBlock, 0,
               stream>>>(grad.const_data_ptr<float>(), xp, x.stride(0), T, H, E, pp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      router_rows_vec(xp, x.stride(0), H) && router_rows_vec(pp, H, H) ? launch_part(std::true_type{})
                                                               : launch_part(std::false_type{});
    }
  });
  router_logits_dw_sum_kernel<<<cdiv(E * H, kBlock), kBlock, 0, stream>>>(part.const_data_ptr<float>(), n_chunks,
                                                                          E * H, dw.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixlora
