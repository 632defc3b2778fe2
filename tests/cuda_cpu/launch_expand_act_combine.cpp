// C ABI launchers of csrc/expand_act_combine/expand_act_combine_kernels.cuh, mirroring
// expand_act_combine_forward_launch / expand_act_combine_backward_launch (and make_args) of
// csrc/expand_act_combine/expand_act_combine.cu (see launchers.h).
#include <vector>

#include "expand_act_combine/expand_act_combine_kernels.cuh"
#include "launchers.h"

using namespace mixlora;
using cuda_cpu::ceil_div;

namespace {

// The inputs of both directions, as the layouts of expand_act_combine.h prepared by cuda_cpu_harness.py:
//   ptrs: G, U (nullptr: ungated), zg, zu, Bg, Bu, Ad, weights, experts, order, offsets
//   ints: G_stride, U_stride, zg_stride, zu_stride, Bg_stride0, Bg_stride1, Bu_stride0, Bu_stride1, Ad_stride0,
//         Ad_stride1, T, K, I, E, Rg, Ru, Rd, weights_fp32 (0: Bg, Bu, Ad in G's dtype; 1: fp32 copies)
template <typename scalar_t, typename weight_t>
Args<scalar_t, weight_t> make_args(const void* const* ptrs, const int64_t* ints, double scale, int act,
                                   double dropout_p, int64_t seed) {
  Args<scalar_t, weight_t> a;
  a.G = static_cast<const scalar_t*>(ptrs[0]);
  a.U = static_cast<const scalar_t*>(ptrs[1]);
  a.zg = static_cast<const float*>(ptrs[2]);
  a.zu = static_cast<const float*>(ptrs[3]);
  a.Bg = static_cast<const weight_t*>(ptrs[4]);
  a.Bu = static_cast<const weight_t*>(ptrs[5]);
  a.Ad = static_cast<const weight_t*>(ptrs[6]);
  a.weights = static_cast<const float*>(ptrs[7]);
  a.experts = static_cast<const int64_t*>(ptrs[8]);
  a.order = static_cast<const int64_t*>(ptrs[9]);
  a.offsets = static_cast<const int64_t*>(ptrs[10]);
  a.G_stride = ints[0];
  a.U_stride = ints[1];
  a.zg_stride = ints[2];
  a.zu_stride = ints[3];
  a.Bg_stride0 = ints[4];
  a.Bg_stride1 = ints[5];
  a.Bu_stride0 = ints[6];
  a.Bu_stride1 = ints[7];
  a.Ad_stride0 = ints[8];
  a.Ad_stride1 = ints[9];
  a.T = ints[10];
  a.K = ints[11];
  a.I = ints[12];
  a.E = ints[13];
  a.Rg = ints[14];
  a.Ru = ints[15];
  a.Rd = ints[16];
  a.scale = static_cast<float>(scale);
  a.act = act;
  a.drop = make_dropout(dropout_p, seed);
  return a;
}

size_t checked_smem(const char* op, int64_t floats, size_t static_bytes) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (bytes + static_bytes > kMaxSmem) {
    throw cuda_cpu::Error(std::string(op) + ": the ranks need more shared memory than the kernel supports");
  }
  return bytes;
}

// The .cu's use_mma: bf16 activations with bf16 weights whose ranks and expert count fit the tensor-core tiles.
bool use_mma(int dtype, const int64_t* ints) {
  return dtype == 2 && ints[17] == 0 && mma_fits(ints[11], ints[13], ints[14], ints[15], ints[16]);
}

// Calls f(scalar_t{}, weight_t{}) for the SIMT kernels: weights in G's dtype, or fp32 copies.
template <typename F>
void dispatch_simt(int dtype, const int64_t* ints, F&& f) {
  cuda_cpu::dispatch_float_half_bf16(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (ints[17]) {
      f(scalar_t{}, float{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

}  // namespace

extern "C" {

// Writes hbar (T, I) in dtype and zd (S, Rd) fp32, contiguous.
int cuda_cpu_expand_act_combine_forward(int dtype, const void* const* ptrs, const int64_t* ints, double scale,
                                        int act, double dropout_p, int64_t seed, void* hbar, float* zd) {
  return cuda_cpu::guarded([&] {
    const int64_t T = ints[10], K = ints[11], I = ints[12], E = ints[13];
    const int64_t Rz = ints[14] + ints[15];
    const int64_t Rd = ints[16];
    if (T == 0) {
      return;
    }
    if (use_mma(dtype, ints)) {
      const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(ptrs, ints, scale, act, dropout_p, seed);
      const TileLayout L = make_tile_layout(K, E, ints[14], ints[15], Rd, false);
      const bool vec = mma_rows_aligned(args, nullptr, 0);
      const int tiles = static_cast<int>(ceil_div(T, L.BT));
      const int splits = mma_splits(tiles, I);
      std::vector<float> part(splits > 1 ? static_cast<size_t>(splits) * T * K * Rd : 0);
      float* out = splits > 1 ? part.data() : zd;
      dispatch_tiles(ints[14], ints[15], Rd, act, vec, args.drop.active,
                     [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
        const auto kernel = eac_fwd_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                              decltype(vec_c)::value, decltype(drop_c)::value>;
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes));
        CUDA_CPU_LAUNCH(kernel, dim3(splits, tiles), kBlock, L.bytes, args, L,
                        static_cast<c10::BFloat16*>(hbar), out);
      });
      if (splits > 1 && Rd > 0) {
        CUDA_CPU_LAUNCH(eac_split_sum_kernel, split_sum_blocks(T * K * Rd), kBlock, 0,
                        static_cast<const float*>(part.data()), splits, T * K, static_cast<int>(Rd),
                        static_cast<int>(Rd), 0, 1.0f, 0, zd, static_cast<float*>(nullptr),
                        static_cast<float*>(nullptr));
      }
      return;
    }
    const size_t smem = checked_smem("expand_act_combine", K * Rz, kTokenStaticSmem);
    dispatch_simt(dtype, ints, [&](auto stag, auto wtag) {
      using scalar_t = decltype(stag);
      using weight_t = decltype(wtag);
      CUDA_CPU_LAUNCH((eac_fwd_kernel<scalar_t, weight_t>), static_cast<unsigned int>(T), kBlock, smem,
                      make_args<scalar_t, weight_t>(ptrs, ints, scale, act, dropout_p, seed),
                      static_cast<scalar_t*>(hbar), zd);
    });
  });
}

// grad_hbar (T, I) in dtype, row stride gh_stride; grad_zd (S, Rd) fp32, row stride gzd_stride. Writes, contiguous:
// dG, dU (T, I) in dtype (dU nullptr when ungated); fp32 dzg (S, Rg), dBg (E, I, Rg), dzu (S, Ru), dBu (E, I, Ru),
// dweights (T, K), dAd (E, Rd, I).
int cuda_cpu_expand_act_combine_backward(int dtype, const void* const* ptrs, const int64_t* ints, double scale,
                                         int act, double dropout_p, int64_t seed, const void* grad_hbar,
                                         int64_t gh_stride, const float* grad_zd, int64_t gzd_stride, void* dG,
                                         void* dU, float* dzg, float* dBg, float* dzu, float* dBu, float* dweights,
                                         float* dAd) {
  return cuda_cpu::guarded([&] {
    const int64_t T = ints[10], K = ints[11], I = ints[12], E = ints[13];
    const int64_t Rg = ints[14], Ru = ints[15];
    const int64_t Rall = Rg + Ru + ints[16];
    const bool mma = use_mma(dtype, ints);
    if (T > 0 && mma) {
      const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(ptrs, ints, scale, act, dropout_p, seed);
      const TileLayout L = make_tile_layout(K, E, Rg, Ru, ints[16], true);
      const bool vec = mma_rows_aligned(args, grad_hbar, gh_stride);
      const int tiles = static_cast<int>(ceil_div(T, L.BT));
      const int splits = mma_splits(tiles, I);
      const int W = static_cast<int>(Rg + Ru + 1);
      std::vector<float> part(static_cast<size_t>(splits) * T * K * W);
      dispatch_tiles(Rg, Ru, ints[16], act, vec, args.drop.active,
                     [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
        const auto kernel = eac_bwd_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                              decltype(vec_c)::value, decltype(drop_c)::value>;
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes));
        CUDA_CPU_LAUNCH(kernel, dim3(splits, tiles), kBlock, L.bytes, args, L,
                        static_cast<const c10::BFloat16*>(grad_hbar), gh_stride, grad_zd, gzd_stride,
                        static_cast<c10::BFloat16*>(dG), static_cast<c10::BFloat16*>(dU), part.data());
      });
      CUDA_CPU_LAUNCH(eac_split_sum_kernel, split_sum_blocks(T * K * W), kBlock, 0,
                      static_cast<const float*>(part.data()), splits, T * K, W, static_cast<int>(Rg),
                      static_cast<int>(Ru), static_cast<float>(scale), static_cast<int>(Rg + Ru), dzg, dzu,
                      dweights);
    }
    if (E > 0 && I > 0 && Rall > 0 && mma) {
      const MmaArgs args = make_args<c10::BFloat16, c10::BFloat16>(ptrs, ints, scale, act, dropout_p, seed);
      const WgLayout L = make_wg_layout(Rg, Ru, ints[16]);
      const bool vec = mma_rows_aligned(args, grad_hbar, gh_stride) && rank_rows_aligned(args, grad_zd, gzd_stride);
      dispatch_tiles(Rg, Ru, ints[16], act, vec, args.drop.active,
                     [&](auto nf, auto act_c, auto vec_c, auto drop_c) {
        const auto kernel = eac_bwd_weight_mma_kernel<decltype(nf)::value, decltype(act_c)::value,
                                              decltype(vec_c)::value, decltype(drop_c)::value>;
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes));
        CUDA_CPU_LAUNCH(kernel, dim3(ceil_div(I, kMmaCols), static_cast<unsigned int>(E)), kBlock, L.bytes, args,
                        L, static_cast<const c10::BFloat16*>(grad_hbar), gh_stride, grad_zd, gzd_stride, dBg, dBu,
                        dAd);
      });
    }
    if (mma) {
      return;
    }
    auto launch_simt = [&](auto stag, auto wtag) {
      using scalar_t = decltype(stag);
      using weight_t = decltype(wtag);
      const Args<scalar_t, weight_t> args = make_args<scalar_t, weight_t>(ptrs, ints, scale, act, dropout_p, seed);
      if (T > 0) {
        const size_t smem = checked_smem("expand_act_combine_backward", K * Rall, kTokenStaticSmem);
        CUDA_CPU_LAUNCH((eac_bwd_token_kernel<scalar_t, weight_t>), static_cast<unsigned int>(T), kBlock, smem, args,
                        static_cast<const scalar_t*>(grad_hbar), gh_stride, grad_zd, gzd_stride,
                        static_cast<scalar_t*>(dG), static_cast<scalar_t*>(dU), dzg, dzu, dweights);
      }
      if (E > 0 && I > 0 && Rall > 0) {
        const size_t smem = checked_smem("expand_act_combine_backward", kChunkSlots * Rall, kWeightStaticSmem);
        const dim3 grid(ceil_div(I, kTileM), static_cast<unsigned int>(E), ceil_div(Rall, kTileN));
        CUDA_CPU_LAUNCH((eac_bwd_weight_kernel<scalar_t, weight_t>), grid, kBlock, smem, args,
                        static_cast<const scalar_t*>(grad_hbar), gh_stride, grad_zd, gzd_stride, dBg, dBu, dAd);
      }
    };
    dispatch_simt(dtype, ints, launch_simt);
  });
}

}  // extern "C"
