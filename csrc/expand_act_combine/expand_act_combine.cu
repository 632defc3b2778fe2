// The expert part of a MixLoRA FFN between the dense gate/up GEMMs and the dense down GEMM (docs/algorithm.md §2-3),
// and its backward. Semantics: mixlora_kernels/ops/expand_act_combine.py. Per slot j = (token t, expert e, w):
//   g_j = G_t + s Bg_e zg_j;  u_j = U_t + s Bu_e zu_j;  h_j = act(g_j) * u_j  (act(g_j) when U is absent)
//   hbar_t = sum_k w_j h_j;  zd_j = Ad_e drop_j(h_j)
//
// The per-slot elementwise part is bandwidth-bound (docs/algorithm.md §2, cost model): the only I-sized rows that must
// move are G_t, U_t (and dH̄_t) read and hbar_t (dG_t, dU_t) written; everything per slot is rank R.
//
// Tensor-core kernels (bf16 G/U with bf16 weights, read as they are; ranks <= 64, K <= 8, shared memory <= 227 KiB):
//   grid (I splits, token tiles); a block walks its I split in steps of 64 columns, staging per step the 64-column
//   slab of every expert's Bg, Bu, Ad (bf16) and the tile's G, U (dH̄) rows in shared memory (~60 KiB from L2 per
//   block-step at E 8, R 16).
//   Both token kernels work on register tiles of mma.sync m16n8k16: 128 slot rows (K padded to a power of two KP)
//   sorted by expert, 16 per warp, so a warp's rows span one or two experts; each product runs over the experts
//   present in the warp's rows (A rows of other experts zeroed) against that expert's slab; per 16-column chunk the
//   per-token sums go through fp32 slot rows in shared memory, summed in k order. fp32 operands (the rank vectors,
//   h, dg, du) are rounded to bf16, as a bf16 LoRA rounds them.
//   forward (eac_fwd_mma_kernel): g, u = G, U + s z B_e^T (z tiles kept in registers), h = act(g) u in the
//     accumulators' registers, hbar_t = sum_k w_j h_j, and zd += drop(h) Ad_e^T with the accumulators reused as an A
//     tile.
//   backward (eac_bwd_mma_kernel): g, u and b = dzd Ad_e, then dh = w dH̄ + drop(b), dg, du, dw += <dH̄, h> once
//     per element; dG_t, dU_t; dzg += dg Bg_e, dzu += du Bu_e with dg, du as A tiles (the slabs read k-major by
//     ldmatrix .trans), accumulated in registers across the steps.
//   The per-slot rank outputs are sums over I: each block writes its split's partial sums by slot, and
//   eac_split_sum_kernel adds the splits in order (deterministic; no atomics). Splits only when the token tiles are
//   fewer than two waves of 132 SMs.
// SIMT kernels (fp32 / fp16 models, fp32 weights in a 16-bit model, and what the tensor-core tiles do not fit):
//   eac_fwd_kernel / eac_bwd_token_kernel: one block per token, a thread per column i; pass A computes hbar_t (dG_t,
//     dU_t), pass B the rank reductions zd_j (dzg_j, dzu_j, dw_j) as fixed-order block sums, recomputing g, u, h.
// Weight gradients: eac_bwd_weight_mma_kernel (tensor-core path; see its comment) and eac_bwd_weight_kernel: dBg_e = s sum_{j->e} dg_j zg_j^T, dBu_e = s sum du_j zu_j^T,
//   dAd_e = sum dzd_j drop_j(h_j)^T as segmented reductions: one block per (64 columns i, expert e, 64 of the
//   Rg+Ru+Rd concatenated rank columns) walks its expert's slots in sorted order, 16 at a time, recomputing dg, du,
//   drop(h) for those 16 x 64 elements into shared memory, then a register-tile FMA (common.cuh). Deterministic:
//   fixed slot order, no atomics.
// Expert ids read from `experts` and slot ids read from `order` are checked by device assertions (see
// csrc/lora_shrink/lora_shrink.cu), once per tile in the tensor-core kernels.

#include "expand_act_combine/expand_act_combine.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include "dispatch.h"
#include "expand_act_combine/expand_act_combine_kernels.cuh"

namespace mixlora {
namespace {

template <typename scalar_t, typename weight_t>
Args<scalar_t, weight_t> make_args(const ExpandActCombineInputs& in) {
  Args<scalar_t, weight_t> a;
  a.G = in.G.const_data_ptr<scalar_t>();
  a.G_stride = in.G.stride(0);
  a.U = in.U.has_value() ? in.U->const_data_ptr<scalar_t>() : nullptr;
  a.U_stride = in.U.has_value() ? in.U->stride(0) : 0;
  a.zg = in.zg.const_data_ptr<float>();
  a.zg_stride = in.zg.stride(0);
  a.zu = in.zu.const_data_ptr<float>();
  a.zu_stride = in.zu.stride(0);
  a.Bg = in.Bg.const_data_ptr<weight_t>();
  a.Bg_stride0 = in.Bg.stride(0);
  a.Bg_stride1 = in.Bg.stride(1);
  a.Bu = in.Bu.const_data_ptr<weight_t>();
  a.Bu_stride0 = in.Bu.stride(0);
  a.Bu_stride1 = in.Bu.stride(1);
  a.Ad = in.Ad.const_data_ptr<weight_t>();
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

// The tensor-core kernels serve bf16 activations with bf16 weights (read as they are) whose padded ranks, K and
// expert slabs fit their tiles; everything else takes the SIMT kernels.
bool use_mma(const ExpandActCombineInputs& in) {
  return in.G.scalar_type() == at::kBFloat16 && in.Bg.scalar_type() == at::kBFloat16 &&
         mma_fits(in.experts.size(1), in.Bg.size(0), in.Bg.size(2), in.Bu.size(2), in.Ad.size(1));
}

// The SIMT kernels: weights in G's dtype, or fp32 (api.cpp's copies of weights of another dtype).
template <typename F>
void dispatch_simt(const ExpandActCombineInputs& in, F&& f) {
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(in.G.scalar_type(), "expand_act_combine", [&] {
    if (in.Bg.scalar_type() == at::kFloat) {
      f(scalar_t{}, float{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

}  // namespace

bool expand_act_combine_reads_weights_as_is(const at::Tensor& G, const at::Tensor& Bg, const at::Tensor& Bu,
                                            const at::Tensor& Ad) {
  return Bg.scalar_type() == G.scalar_type() && Bu.scalar_type() == G.scalar_type() &&
         Ad.scalar_type() == G.scalar_type();
}

void expand_act_combine_forward_launch(const ExpandActCombineInputs& in, at::Tensor& hbar, at::Tensor& zd,
                                       cudaStream_t stream) {
  const int64_t T = in.G.size(0);
  const int64_t I = in.G.size(1);
  const int64_t K = in.experts.size(1);
  const int64_t Rd = in.Ad.size(1);
  const int64_t Rz = in.Bg.size(2) + in.Bu.size(2);
  if (T == 0) {
    return;
  }
  if (use_mma(in)) {
    const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(in);
    const TileLayout L = make_tile_layout(K, in.Bg.size(0), in.Bg.size(2), in.Bu.size(2), Rd, false);
    const bool vec = mma_rows_aligned(args, nullptr, 0);
    const unsigned int tiles = ceil_div(T, L.BT);
    const int splits = mma_splits(static_cast<int>(tiles), I);
    at::Tensor part = splits > 1 ? at::empty({splits, T * K, Rd}, zd.options()) : zd;
    dispatch_tiles(in.Bg.size(2), in.Bu.size(2), Rd, in.activation, vec, args.drop.active,
                   [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
      const auto kernel = eac_fwd_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                            decltype(vec_c)::value, decltype(drop_c)::value>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(L.bytes)));
      kernel<<<dim3(splits, tiles), kBlock, L.bytes, stream>>>(
          args, L, hbar.mutable_data_ptr<c10::BFloat16>(), part.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (splits > 1 && Rd > 0) {
      eac_split_sum_kernel<<<split_sum_blocks(T * K * Rd), kBlock, 0, stream>>>(
          part.const_data_ptr<float>(), splits, T * K, static_cast<int>(Rd), static_cast<int>(Rd), 0, 1.0f, 0,
          zd.mutable_data_ptr<float>(), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  const size_t smem = checked_smem("expand_act_combine", K * Rz, kTokenStaticSmem, "K * (Rg + Ru)");
  dispatch_simt(in, [&](auto stag, auto wtag) {
    using scalar_t = decltype(stag);
    using weight_t = decltype(wtag);
    eac_fwd_kernel<scalar_t, weight_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
        make_args<scalar_t, weight_t>(in), hbar.mutable_data_ptr<scalar_t>(), zd.mutable_data_ptr<float>());
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
  const int64_t Rg = in.Bg.size(2);
  const int64_t Ru = in.Bu.size(2);
  const int64_t Rall = Rg + Ru + in.Ad.size(1);
  const bool mma = use_mma(in);
  if (T > 0 && mma) {
    const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(in);
    const TileLayout L = make_tile_layout(K, E, Rg, Ru, in.Ad.size(1), true);
    const bool vec = mma_rows_aligned(args, grad_hbar.const_data_ptr(), grad_hbar.stride(0));
    const unsigned int tiles = ceil_div(T, L.BT);
    const int splits = mma_splits(static_cast<int>(tiles), I);
    const int64_t W = Rg + Ru + 1;
    at::Tensor part = at::empty({splits, T * K, W}, dzg.options());
    dispatch_tiles(Rg, Ru, in.Ad.size(1), in.activation, vec, args.drop.active,
                   [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
      const auto kernel = eac_bwd_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                            decltype(vec_c)::value, decltype(drop_c)::value>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(L.bytes)));
      kernel<<<dim3(splits, tiles), kBlock, L.bytes, stream>>>(
          args, L, grad_hbar.const_data_ptr<c10::BFloat16>(), grad_hbar.stride(0), grad_zd.const_data_ptr<float>(),
          grad_zd.stride(0), dG.mutable_data_ptr<c10::BFloat16>(),
          in.U.has_value() ? dU.mutable_data_ptr<c10::BFloat16>() : nullptr, part.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    eac_split_sum_kernel<<<split_sum_blocks(T * K * W), kBlock, 0, stream>>>(
        part.const_data_ptr<float>(), splits, T * K, static_cast<int>(W), static_cast<int>(Rg),
        static_cast<int>(Ru), static_cast<float>(in.scale), static_cast<int>(Rg + Ru),
        dzg.mutable_data_ptr<float>(), dzu.mutable_data_ptr<float>(), dweights.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (E > 0 && I > 0 && Rall > 0 && mma) {
    const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(in);
    const WgLayout L = make_wg_layout(Rg, Ru, in.Ad.size(1));
    const bool vec = mma_rows_aligned(args, grad_hbar.const_data_ptr(), grad_hbar.stride(0)) &&
                     rank_rows_aligned(args, grad_zd.const_data_ptr<float>(), grad_zd.stride(0));
    dispatch_tiles(Rg, Ru, in.Ad.size(1), in.activation, vec, args.drop.active,
                   [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
      const auto kernel = eac_bwd_weight_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                            decltype(vec_c)::value, decltype(drop_c)::value>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(L.bytes)));
      kernel<<<dim3(ceil_div(I, kMmaCols), static_cast<unsigned int>(E)), kBlock, L.bytes, stream>>>(
          args, L, grad_hbar.const_data_ptr<c10::BFloat16>(), grad_hbar.stride(0), grad_zd.const_data_ptr<float>(),
          grad_zd.stride(0), dBg.mutable_data_ptr<float>(), dBu.mutable_data_ptr<float>(),
          dAd.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (mma) {
    return;
  }
  dispatch_simt(in, [&](auto stag, auto wtag) {
    using scalar_t = decltype(stag);
    using weight_t = decltype(wtag);
    const Args<scalar_t, weight_t> args = make_args<scalar_t, weight_t>(in);
    if (T > 0) {
      const size_t smem =
          checked_smem("expand_act_combine_backward", K * Rall, kTokenStaticSmem, "K * (Rg + Ru + Rd)");
      eac_bwd_token_kernel<scalar_t, weight_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
          args, grad_hbar.const_data_ptr<scalar_t>(), grad_hbar.stride(0), grad_zd.const_data_ptr<float>(),
          grad_zd.stride(0), dG.mutable_data_ptr<scalar_t>(),
          in.U.has_value() ? dU.mutable_data_ptr<scalar_t>() : nullptr, dzg.mutable_data_ptr<float>(),
          dzu.mutable_data_ptr<float>(), dweights.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (E > 0 && I > 0 && Rall > 0) {
      // Every block writes its whole tile (zeros for an empty expert), so no memset is needed.
      const size_t smem = checked_smem("expand_act_combine_backward", kChunkSlots * Rall, kWeightStaticSmem,
                                       "16 * (Rg + Ru + Rd)");
      const dim3 grid(ceil_div(I, kTileM), static_cast<unsigned int>(E), ceil_div(Rall, kTileN));
      eac_bwd_weight_kernel<scalar_t, weight_t><<<grid, kBlock, smem, stream>>>(
          args, grad_hbar.const_data_ptr<scalar_t>(), grad_hbar.stride(0), grad_zd.const_data_ptr<float>(),
          grad_zd.stride(0), dBg.mutable_data_ptr<float>(), dBu.mutable_data_ptr<float>(),
          dAd.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace mixlora
