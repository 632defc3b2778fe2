// Grouped LoRA shrink (docs/algorithm.md §2-3) and its backward. Semantics: mixlora_kernels/ops/lora_shrink.py.
//
// Forward, z_j = A_e drop_j(x_t) for slot j = t*K + k routed to expert e:
//   lora_shrink_fwd_kernel: a grouped GEMM over the expert-sorted slot order. Block = (64 consecutive positions
//   of one expert's segment, 64 rank columns); it loops over H in chunks of 32, gathering the 64 token rows of x
//   straight into shared memory (the gather and the dropout mask are fused into the load: no (S, H) copy),
//   and the 64 x 32 slice of A_e next to it. Each thread accumulates 16 outputs in fp32 registers.
//   grid = (ceil(S/64) + E, ceil(R/64)): an upper bound on the per-expert tile count, so nothing is read on the
//   host; surplus blocks exit.
// Backward:
//   lora_shrink_bwd_dx_kernel: token-major, one block per token: dx_t = sum_k drop_j(A_e^T dz_j), the K slots of
//   the token summed inside one thread (k = 0..K-1 in order), no atomics. dz_j (K x R) is staged in shared
//   memory; A_e is read from L2 (E*R*H*4 bytes, a few MB).
//   lora_shrink_bwd_dA_kernel: dA_e = sum_{j -> e} dz_j drop_j(x_t)^T, a segmented reduction: one block per
//   (64 columns h, expert e, 64 ranks) walks its expert's slots in sorted order in chunks of 16. Deterministic
//   (fixed order, no atomics). Tuning note: when one expert holds most slots only ceil(H/64) blocks work on it;
//   a split over the slots with a second fixed-order pass is the next step if that shows up in profiles.
// Expert ids: the forward takes the expert of a slot from `offsets` (as the reference does); the dx kernel reads
// `experts` and checks each id with a device assertion (CUDA_KERNEL_ASSERT: reported at the next synchronising
// call as "device-side assert triggered"; the CUDA context is unusable afterwards). Slot ids read from `order`
// are checked the same way.

#include "lora_shrink/lora_shrink.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "lora_shrink/lora_shrink_kernels.cuh"

namespace mixlora {
namespace {

unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace

void lora_shrink_forward_launch(const at::Tensor& x, const at::Tensor& A, const at::Tensor& order,
                                const at::Tensor& offsets, int64_t K, double dropout_p, int64_t seed, at::Tensor& z,
                                cudaStream_t stream) {
  const int64_t S = z.size(0);
  const int64_t R = z.size(1);
  const int64_t H = x.size(1);
  const int64_t E = A.size(0);
  if (S == 0 || R == 0 || H == 0) {  // H = 0: the caller allocated z as zeros
    return;
  }
  const dim3 grid(ceil_div(S, kTileM) + static_cast<unsigned int>(E), ceil_div(R, kTileN));
  const Dropout drop = make_dropout(dropout_p, seed);
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink", [&] {
    auto launch = [&](auto wtag) {
      using weight_t = decltype(wtag);
      lora_shrink_fwd_kernel<scalar_t, weight_t><<<grid, kBlock, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), A.const_data_ptr<weight_t>(), A.stride(0), A.stride(1),
          order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), E, S, K, H, R, drop,
          z.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    A.scalar_type() == at::kFloat ? launch(float{}) : launch(scalar_t{});
  });
}

void lora_shrink_backward_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& A,
                                 const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                 double dropout_p, int64_t seed, at::Tensor& dx, at::Tensor& dA,
                                 cudaStream_t stream) {
  const int64_t T = x.size(0);
  const int64_t H = x.size(1);
  const int64_t E = A.size(0);
  const int64_t R = A.size(1);
  const int64_t K = experts.size(1);
  const int64_t S = T * K;
  const Dropout drop = make_dropout(dropout_p, seed);
  if (T > 0 && H > 0) {
    const size_t smem = static_cast<size_t>(K * R) * sizeof(float);
    TORCH_CHECK(smem <= 48 * 1024, "lora_shrink_backward: K * R = ", K * R, " floats of grad_z per token exceed the ",
                "48 KiB of shared memory this kernel version stages them in; use the torch or triton backend");
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink_backward", [&] {
      auto launch = [&](auto wtag) {
        using weight_t = decltype(wtag);
        lora_shrink_bwd_dx_kernel<scalar_t, weight_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
            grad_z.const_data_ptr<float>(), grad_z.stride(0), A.const_data_ptr<weight_t>(), A.stride(0),
            A.stride(1), experts.const_data_ptr<int64_t>(), E, K, H, R, drop, dx.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      A.scalar_type() == at::kFloat ? launch(float{}) : launch(scalar_t{});
    });
  }
  if (E > 0 && R > 0 && H > 0) {
    // Every block writes its tile, zeros included, so empty experts get dA_e = 0 without a memset.
    const dim3 grid(ceil_div(H, kTileM), static_cast<unsigned int>(E), ceil_div(R, kTileN));
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink_backward", [&] {
      lora_shrink_bwd_dA_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          grad_z.const_data_ptr<float>(), grad_z.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
          order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), S, K, H, R, drop,
          dA.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace mixlora
