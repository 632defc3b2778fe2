// Grouped LoRA shrink (docs/algorithm.md §2-3) and its backward. Semantics: mixlora_kernels/ops/lora_shrink.py.
// The kernels (tensor cores, bf16 operand planes, fp32 accumulation) are csrc/lora_tiles.cuh's; their algorithm and
// block shapes are described there. Launches, 256 threads each, all on the caller's stream, no host synchronisation:
//   forward   z_j = A_e drop_j(x_t):        slot_rank_mma_kernel, grid (ceil(S/64) + E, ceil(R/64)): 64 sorted
//             slots of one expert x 64 ranks per block (an upper bound on the per-expert tile count, so nothing is
//             read on the host; surplus blocks exit); x gathered by token and masked while it is staged.
//   backward  dx_t = sum_k drop_j(A_e^T dz_j): token_fold_mma_kernel, grid (ceil(H / (64 h_tiles)), ceil(T/64)),
//             the expert fold of the token's dz_j (built once per block where it fits: plan_token_fold) times every
//             expert's A (one pass per slot k when dropout masks them);
//             dA_e = sum_{j -> e} dz_j drop_j(x_t)^T: weight_grad_mma_kernel, grid (ceil(H/64), E, ceil(R/64)).
// Expert ids read from `experts` and slot ids read from `order` are checked by device assertions
// (CUDA_KERNEL_ASSERT: reported at the next synchronising call as "device-side assert triggered"; the CUDA context
// is unusable afterwards); the forward takes a slot's expert from `offsets`, as the reference does.

#include "lora_shrink/lora_shrink.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "lora_tiles.cuh"

namespace mixlora {

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
  const Dropout drop = make_dropout(dropout_p, seed);
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink", [&] {
    auto launch = [&](auto wtag) {
      using weight_t = decltype(wtag);
      const auto p = shrink_forward_args(x.const_data_ptr<scalar_t>(), x.stride(0), A.const_data_ptr<weight_t>(),
                                         A.stride(0), A.stride(1), order.const_data_ptr<int64_t>(),
                                         offsets.const_data_ptr<int64_t>(), E, S, K, H, R, drop,
                                         z.mutable_data_ptr<float>());
      dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
        using dot_t = shrink_dot_t<scalar_t, weight_t>;
        const auto kernel = slot_rank_mma_kernel<scalar_t, weight_t, dot_t, decltype(variant)>;
        const size_t smem = slot_rank_smem_bytes<scalar_t, weight_t, dot_t>();
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        kernel<<<slot_rank_grid(S, E, (R + kTile - 1) / kTile), kBlock, smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
  const Dropout drop = make_dropout(dropout_p, seed);
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink_backward", [&] {
    if (T > 0 && H > 0) {
      auto launch = [&](auto wtag) {
        using weight_t = decltype(wtag);
        const auto p = shrink_dx_args(grad_z.const_data_ptr<float>(), grad_z.stride(0), A.const_data_ptr<weight_t>(),
                                      A.stride(0), A.stride(1), experts.const_data_ptr<int64_t>(), E, T, K, H, R, drop,
                                      dx.mutable_data_ptr<scalar_t>(), current_device_sms());
        dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
          auto launch_fold = [&](auto whole) {
            const auto kernel = token_fold_mma_kernel<weight_t, scalar_t, shrink_dot_t<scalar_t, weight_t>,
                                                      decltype(variant), decltype(whole)::value>;
            C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(p.plan.smem)));
            kernel<<<token_fold_grid(T, H, p.plan), kBlock, p.plan.smem, stream>>>(p);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          p.plan.whole ? launch_fold(std::true_type{}) : launch_fold(std::false_type{});
        });
      };
      A.scalar_type() == at::kFloat ? launch(float{}) : launch(scalar_t{});
    }
    if (E > 0 && R > 0 && H > 0) {  // every block writes its tile, zeros included: dA_e = 0 for an empty expert
      const auto p = shrink_dA_args(grad_z.const_data_ptr<float>(), grad_z.stride(0), x.const_data_ptr<scalar_t>(),
                                    x.stride(0), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                    T * K, K, H, R, drop, dA.mutable_data_ptr<float>());
      auto launch = [&](auto wtag) {  // dA is fp32 whatever A's dtype; A's dtype sets the products' precision
        using dot_t = shrink_dot_t<scalar_t, decltype(wtag)>;
        dispatch_variant<true, true>(drop.active, p.aligned(), [&](auto variant) {
          const auto kernel = weight_grad_mma_kernel<scalar_t, dot_t, decltype(variant)>;
          const size_t smem = weight_grad_smem_bytes<scalar_t, dot_t>();
          C10_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
          kernel<<<weight_grad_grid(H, E, R), kBlock, smem, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      };
      A.scalar_type() == at::kFloat ? launch(float{}) : launch(scalar_t{});
    }
  });
}

}  // namespace mixlora
