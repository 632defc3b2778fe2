// Down-projection LoRA expand, combined per token (docs/algorithm.md §2-3), and its backward. Semantics:
// mixlora_kernels/ops/lora_expand_combine.py.
//
// Forward, y_t = s sum_k w_j B_e zd_j (fp32 out):
//   lora_expand_combine_fwd_kernel: token-major, one block per token, one thread per output column h (strided).
//   The token's K rank-R vectors zd_j sit in shared memory; B_e rows (R contiguous floats per h) come from L2.
//   The K slots are summed in order k = 0..K-1 inside one thread: no atomics, no (S, H) intermediate.
// Backward, with q_j = s B_e^T dy_t (rank R):
//   lora_expand_combine_bwd_q_kernel: one block per token; dy_t is read once per slot (the second slot's reads
//   hit L1/L2); each of the R outputs of q_j is a block reduction over H (deterministic: fixed-order butterfly +
//   fixed warp order, see common.cuh), computed 32 ranks per pass. Then dzd_j = w_j q_j and
//   dw_j = <q_j, zd_j> (one thread, r in order).
//   lora_expand_combine_bwd_dB_kernel: dB_e = s sum_{j -> e} (w_j dy_t) zd_j^T, a segmented reduction: one block
//   per (64 columns h, expert e, 64 ranks) walks its expert's slots in sorted order (same scheme as lora_shrink's
//   dA, same tuning note on a dominant expert).
// Expert ids read from `experts` are checked by device assertions (see csrc/lora_shrink/lora_shrink.cu).

#include "lora_expand_combine/lora_expand_combine.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "lora_expand_combine/lora_expand_combine_kernels.cuh"

namespace mixlora {
namespace {

unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace

void lora_expand_combine_forward_launch(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                        const at::Tensor& experts, double scale, at::Tensor& y,
                                        cudaStream_t stream) {
  const int64_t T = y.size(0);
  const int64_t H = y.size(1);
  const int64_t K = experts.size(1);
  const int64_t R = B.size(2);
  if (T == 0 || H == 0) {
    return;
  }
  const size_t smem = static_cast<size_t>(K * R) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "lora_expand_combine: K * R = ", K * R, " floats of zd per token exceed the ",
              "48 KiB of shared memory this kernel version stages them in; use the torch or triton backend");
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(B.scalar_type(), "lora_expand_combine", [&] {
    lora_expand_combine_fwd_kernel<scalar_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
        zd.const_data_ptr<float>(), zd.stride(0), B.const_data_ptr<scalar_t>(), B.stride(0), B.stride(1),
        weights.const_data_ptr<float>(), experts.const_data_ptr<int64_t>(), B.size(0), K, H, R,
        static_cast<float>(scale), y.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  if (T > 0) {
    const size_t smem = static_cast<size_t>(R) * sizeof(float);
    TORCH_CHECK(smem + (kWarps + 1) * kRanksPerPass * sizeof(float) <= 48 * 1024, "lora_expand_combine_backward: ",
                "rank R = ", R, " exceeds what this kernel version keeps in shared memory");
    // B in grad_y's dtype or fp32; an fp32 grad_y (y is fp32) also takes B in its 16-bit dtype.
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_y.scalar_type(), "lora_expand_combine_backward", [&] {
      using gy_t = scalar_t;
      auto launch = [&](auto wtag) {
        using weight_t = decltype(wtag);
        lora_expand_combine_bwd_q_kernel<gy_t, weight_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
            grad_y.const_data_ptr<gy_t>(), grad_y.stride(0), zd.const_data_ptr<float>(), zd.stride(0),
            B.const_data_ptr<weight_t>(), B.stride(0), B.stride(1), weights.const_data_ptr<float>(),
            experts.const_data_ptr<int64_t>(), E, K, H, R, static_cast<float>(scale),
            dzd.mutable_data_ptr<float>(), dweights.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (B.scalar_type() == grad_y.scalar_type()) {
        launch(gy_t{});
      } else if (B.scalar_type() == at::kFloat) {
        launch(float{});
      } else if (B.scalar_type() == at::kBFloat16) {
        launch(c10::BFloat16{});
      } else {
        launch(c10::Half{});
      }
    });
  }
  if (E > 0 && H > 0 && R > 0) {
    const dim3 grid(ceil_div(H, kTileM), static_cast<unsigned int>(E), ceil_div(R, kTileN));
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_y.scalar_type(), "lora_expand_combine_backward", [&] {
      lora_expand_combine_bwd_dB_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), zd.const_data_ptr<float>(), zd.stride(0),
          weights.const_data_ptr<float>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
          T * K, K, H, R, static_cast<float>(scale), dB.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace mixlora
