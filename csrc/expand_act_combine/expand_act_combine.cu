// The expert part of a MixLoRA FFN between the dense gate/up GEMMs and the dense down GEMM (docs: mixlora.md §2-3),
// and its backward. Semantics: mixlora_kernels/ops/expand_act_combine.py. Per slot j = (token t, expert e, w):
//   g_j = G_t + s Bg_e zg_j;  u_j = U_t + s Bu_e zu_j;  h_j = act(g_j) * u_j  (act(g_j) when U is absent)
//   hbar_t = sum_k w_j h_j;  zd_j = Ad_e drop_j(h_j)
//
// The per-slot elementwise part is bandwidth-bound (mixlora.md §2 cost model): the only I-sized rows that must
// move are G_t, U_t (read) and hbar_t (written); everything per slot is rank R and the expert weights stay in L2.
// Hence one thread block per token:
//   eac_fwd_kernel, pass A: one thread per column i (strided); G_t[i], U_t[i] are read once and reused for all K
//     slots (g, u, h recomputed from the token's rank-R vectors in shared memory and the expert's B rows, R
//     contiguous floats per i, from L2); hbar_t[i] = sum_k w_j h_j in fp32, in order k = 0..K-1, written once.
//   pass B: the down shrink zd_j = Ad_e drop_j(h_j): a block reduction over i (fixed order, common.cuh) with 32
//     ranks of fp32 partial sums per thread per pass. h_j is recomputed in this pass rather than kept: the row no
//     longer fits registers, and the re-read of G_t/U_t hits L1/L2 (the block just streamed it). Cost: the pass
//     count K * ceil(Rd/32) re-reads of the token's rows from cache. A tuning candidate is folding pass B into
//     pass A with K*Rd register accumulators for the common K <= 2, Rd <= 16 (to measure on the H200).
// Backward (g, u, h recomputed, never stored):
//   eac_bwd_token_kernel, pass A: per column i, for k = 0..K-1: dh_j = w_j dhbar_t + drop_j(Ad_e^T dzd_j),
//     dg_j = dh_j u_j act'(g_j), du_j = dh_j act(g_j); dG_t = sum_k dg_j, dU_t = sum_k du_j (token-major, no
//     atomics). Pass B: per slot the rank-R reductions dzg_j = s Bg_e^T dg_j, dzu_j = s Bu_e^T du_j and
//     dw_j = <dhbar_t, h_j>, 32 outputs per pass, block reductions as above.
//   eac_bwd_weight_kernel: dBg_e = s sum_{j->e} dg_j zg_j^T, dBu_e = s sum du_j zu_j^T, dAd_e = sum dzd_j
//     drop_j(h_j)^T as segmented reductions: one block per (64 columns i, expert e, 64 of the Rg+Ru+Rd
//     concatenated rank columns) walks its expert's slots in sorted order, 16 at a time, recomputing
//     dg, du, drop(h) for those 16 x 64 elements into shared memory, then a register-tile FMA (common.cuh).
//     Deterministic: fixed slot order, no atomics. The recompute costs O(Rg+Ru+Rd) per element, the same order
//     as the reduction itself; storing dg/du/h instead would need 3 (S, I) fp32 scratch tensors.
// Expert ids read from `experts` and slot ids read from `order` are checked by device assertions (see
// csrc/lora_shrink/lora_shrink.cu).

#include "expand_act_combine/expand_act_combine.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "dispatch.h"
#include "expand_act_combine/expand_act_combine_kernels.cuh"

namespace mixlora {
namespace {

template <typename scalar_t>
Args<scalar_t> make_args(const ExpandActCombineInputs& in) {
  Args<scalar_t> a;
  a.G = in.G.const_data_ptr<scalar_t>();
  a.G_stride = in.G.stride(0);
  a.U = in.U.has_value() ? in.U->const_data_ptr<scalar_t>() : nullptr;
  a.U_stride = in.U.has_value() ? in.U->stride(0) : 0;
  a.zg = in.zg.const_data_ptr<float>();
  a.zg_stride = in.zg.stride(0);
  a.zu = in.zu.const_data_ptr<float>();
  a.zu_stride = in.zu.stride(0);
  a.Bg = in.Bg.const_data_ptr<float>();
  a.Bg_stride0 = in.Bg.stride(0);
  a.Bg_stride1 = in.Bg.stride(1);
  a.Bu = in.Bu.const_data_ptr<float>();
  a.Bu_stride0 = in.Bu.stride(0);
  a.Bu_stride1 = in.Bu.stride(1);
  a.Ad = in.Ad.const_data_ptr<float>();
  a.Ad_stride0 = in.Ad.stride(0);
  a.Ad_stride1 = in.Ad.stride(1);
  a.weights = in.weights.const_data_ptr<float>();
  a.experts = in.experts.const_data_ptr<int64_t>();
  a.order = in.order.const_data_ptr<int64_t>();
  a.offsets = in.offsets.const_data_ptr<int64_t>();
  a.T = in.G.size(0);
  a.K = in.experts.size(1);
  a.I = in.G.size(1);
  a.E = in.Bg.size(0);
  a.Rg = in.Bg.size(2);
  a.Ru = in.Bu.size(2);
  a.Rd = in.Ad.size(1);
  a.scale = static_cast<float>(in.scale);
  a.act = in.activation;
  a.drop = make_dropout(in.dropout_p, in.seed);
  return a;
}

unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

// Dynamic shared memory of `floats` floats for a kernel with `static_bytes` of static shared memory, within the
// 48 KiB a launch gets without an opt-in (ranks up to several hundred fit; larger ones are refused clearly).
size_t checked_smem(const char* op, int64_t floats, size_t static_bytes, const char* what) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  TORCH_CHECK(bytes + static_bytes <= kMaxSmem, op, ": ", what, " = ", floats, " floats need ", bytes,
              " bytes of shared memory, more than the ", kMaxSmem - static_bytes,
              " this kernel version supports; use the torch or triton backend for such ranks");
  return bytes;
}

}  // namespace

void expand_act_combine_forward_launch(const ExpandActCombineInputs& in, at::Tensor& hbar, at::Tensor& zd,
                                       cudaStream_t stream) {
  const int64_t T = in.G.size(0);
  const int64_t K = in.experts.size(1);
  const int64_t Rz = in.Bg.size(2) + in.Bu.size(2);
  if (T == 0) {
    return;
  }
  const size_t smem = checked_smem("expand_act_combine", K * Rz, kTokenStaticSmem, "K * (Rg + Ru)");
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(in.G.scalar_type(), "expand_act_combine", [&] {
    eac_fwd_kernel<scalar_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
        make_args<scalar_t>(in), hbar.mutable_data_ptr<scalar_t>(), zd.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void expand_act_combine_backward_launch(const at::Tensor& grad_hbar, const at::Tensor& grad_zd,
                                        const ExpandActCombineInputs& in, at::Tensor& dG, at::Tensor& dU,
                                        at::Tensor& dzg, at::Tensor& dBg, at::Tensor& dzu, at::Tensor& dBu,
                                        at::Tensor& dweights, at::Tensor& dAd, cudaStream_t stream) {
  const int64_t T = in.G.size(0);
  const int64_t I = in.G.size(1);
  const int64_t K = in.experts.size(1);
  const int64_t E = in.Bg.size(0);
  const int64_t Rall = in.Bg.size(2) + in.Bu.size(2) + in.Ad.size(1);
  if (T > 0) {
    const size_t smem = checked_smem("expand_act_combine_backward", K * Rall, kTokenStaticSmem, "K * (Rg + Ru + Rd)");
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(in.G.scalar_type(), "expand_act_combine_backward", [&] {
      eac_bwd_token_kernel<scalar_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
          make_args<scalar_t>(in), grad_hbar.const_data_ptr<scalar_t>(), grad_hbar.stride(0),
          grad_zd.const_data_ptr<float>(), grad_zd.stride(0), dG.mutable_data_ptr<scalar_t>(),
          in.U.has_value() ? dU.mutable_data_ptr<scalar_t>() : nullptr, dzg.mutable_data_ptr<float>(),
          dzu.mutable_data_ptr<float>(), dweights.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (E > 0 && I > 0 && Rall > 0) {
    // Every block writes its whole tile (zeros for an empty expert), so no memset is needed.
    const size_t smem = checked_smem("expand_act_combine_backward", kChunkSlots * Rall, kWeightStaticSmem,
                                     "16 * (Rg + Ru + Rd)");
    const dim3 grid(ceil_div(I, kTileM), static_cast<unsigned int>(E), ceil_div(Rall, kTileN));
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(in.G.scalar_type(), "expand_act_combine_backward", [&] {
      eac_bwd_weight_kernel<scalar_t><<<grid, kBlock, smem, stream>>>(
          make_args<scalar_t>(in), grad_hbar.const_data_ptr<scalar_t>(), grad_hbar.stride(0),
          grad_zd.const_data_ptr<float>(), grad_zd.stride(0), dBg.mutable_data_ptr<float>(),
          dBu.mutable_data_ptr<float>(), dAd.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace mixlora
