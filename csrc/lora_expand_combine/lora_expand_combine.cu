// Down-projection LoRA expand, combined per token (docs/algorithm.md §2-3), and its backward. Semantics:
// mixlora_kernels/ops/lora_expand_combine.py. The kernels (tensor cores, bf16 operand planes, fp32 accumulation)
// are csrc/lora_tiles.cuh's; their algorithm and block shapes are described there. Launches, 256 threads each, all
// on the caller's stream, no host synchronisation:
//   forward   y_t = s sum_k w_j B_e zd_j (fp32): token_fold_mma_kernel, grid (ceil(H / (64 h_tiles)), ceil(T/64)):
//             the expert fold of the token's w_j zd_j (built once per block where it fits: plan_token_fold) times
//             every expert's B; the K slots summed in the MMA, no atomics, no (S, H) intermediate.
//   backward  q_j = s B_e^T dy_t, dzd_j = w_j q_j, dw_j = <q_j, zd_j>: slot_rank_mma_kernel, grid (ceil(S/64) + E, 1)
//             (a block loops over the rank tiles, so dw_j sums all of them in order);
//             dB_e = s sum_{j -> e} (w_j zd_j) dy_t^T: weight_grad_mma_kernel, grid (ceil(H/64), E, ceil(R/64)).
// Expert ids read from `experts` (forward) and slot ids read from `order` (backward) are checked by device assertions
// (see csrc/lora_shrink/lora_shrink.cu); the backward takes a slot's expert from `offsets`, as the reference does.

#include "lora_expand_combine/lora_expand_combine.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "lora_tiles.cuh"

namespace mixlora {

void lora_expand_combine_forward_launch(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                        const at::Tensor& experts, double scale, at::Tensor& y,
                                        cudaStream_t stream) {
  const int64_t T = y.size(0);
  const int64_t H = y.size(1);
  const int64_t K = experts.size(1);
  if (T == 0 || H == 0) {
    return;
  }
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(B.scalar_type(), "lora_expand_combine", [&] {
    const auto p = expand_forward_args(zd.const_data_ptr<float>(), zd.stride(0), weights.const_data_ptr<float>(),
                                       experts.const_data_ptr<int64_t>(), B.const_data_ptr<scalar_t>(), B.stride(0),
                                       B.stride(1), B.size(0), T, K, H, B.size(2), static_cast<float>(scale),
                                       y.mutable_data_ptr<float>(), current_device_sms());
    dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
      auto launch = [&](auto whole) {
        const auto kernel =
            token_fold_mma_kernel<scalar_t, float, expand_dot_t<scalar_t>, decltype(variant), decltype(whole)::value>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(p.plan.smem)));
        kernel<<<token_fold_grid(T, H, p.plan), kBlock, p.plan.smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      p.plan.whole ? launch(std::true_type{}) : launch(std::false_type{});
    });
  });
}

void lora_expand_combine_backward_launch(const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B,
                                         const at::Tensor& weights, const at::Tensor& experts,
                                         const at::Tensor& order, const at::Tensor& offsets, double scale,
                                         at::Tensor& dzd, at::Tensor& dB, at::Tensor& dweights,
                                         cudaStream_t stream) {
  const int64_t T = grad_y.size(0);
  const int64_t H = grad_y.size(1);
  const int64_t K = experts.size(1);
  const int64_t E = B.size(0);
  const int64_t R = B.size(2);
  const float s = static_cast<float>(scale);
  // B in grad_y's dtype or fp32; an fp32 grad_y (y is fp32) also takes B in its 16-bit dtype. f(B's element type).
  auto with_weight_t = [&](auto gy_tag, auto f) {
    using gy_t = decltype(gy_tag);
    if (B.scalar_type() == grad_y.scalar_type()) {
      f(gy_t{});
    } else if (B.scalar_type() == at::kFloat) {
      f(float{});
    } else if (B.scalar_type() == at::kBFloat16) {
      f(c10::BFloat16{});
    } else {
      f(c10::Half{});
    }
  };
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_y.scalar_type(), "lora_expand_combine_backward", [&] {
    using gy_t = scalar_t;
    if (T > 0) {  // R = 0 or H = 0 too: dw_j = 0
      with_weight_t(gy_t{}, [&](auto wtag) {
        using weight_t = decltype(wtag);
        const auto p = expand_q_args(grad_y.const_data_ptr<gy_t>(), grad_y.stride(0), zd.const_data_ptr<float>(),
                                     zd.stride(0), B.const_data_ptr<weight_t>(), B.stride(0), B.stride(1),
                                     weights.const_data_ptr<float>(), order.const_data_ptr<int64_t>(),
                                     offsets.const_data_ptr<int64_t>(), E, T * K, K, H, R, s,
                                     dzd.mutable_data_ptr<float>(), dweights.mutable_data_ptr<float>());
        dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
          using dot_t = expand_dot_t<weight_t>;
          const auto kernel = slot_rank_mma_kernel<gy_t, weight_t, dot_t, decltype(variant)>;
          const size_t smem = slot_rank_smem_bytes<gy_t, weight_t, dot_t>();
          C10_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
          kernel<<<slot_rank_grid(T * K, E, 1), kBlock, smem, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
    if (E > 0 && H > 0 && R > 0) {  // every block writes its tile, zeros included: dB_e = 0 for an empty expert
      const auto p = expand_dB_args(grad_y.const_data_ptr<gy_t>(), grad_y.stride(0), zd.const_data_ptr<float>(),
                                    zd.stride(0), weights.const_data_ptr<float>(), order.const_data_ptr<int64_t>(),
                                    offsets.const_data_ptr<int64_t>(), T * K, K, H, R, s,
                                    dB.mutable_data_ptr<float>());
      with_weight_t(gy_t{}, [&](auto wtag) {  // dB is fp32 whatever B's dtype; B's sets the products' precision
        using dot_t = expand_dot_t<decltype(wtag)>;
        dispatch_variant<false, false>(false, p.aligned(), [&](auto variant) {
          const auto kernel = weight_grad_mma_kernel<gy_t, dot_t, decltype(variant)>;
          const size_t smem = weight_grad_smem_bytes<gy_t, dot_t>();
          C10_CUDA_CHECK(
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
          kernel<<<weight_grad_grid(H, E, R), kBlock, smem, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  });
}

}  // namespace mixlora
