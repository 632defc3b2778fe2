// mixlora::expand_act_combine and its backward on CPU tensors (the semantics: mixlora_kernels/ops/expand_act_combine.py).
//
// Layout: slots in expert-sorted order, cut into tiles of at most kTileRows rows of one expert; columns of I cut into
// blocks (cpu_common.h: column_blocks). One task per column block walks every tile in sorted order:
//   forward   gz = s zg Bgᵀ and uz = s zu Buᵀ for the tile's columns (GEMMs into L1/L2-resident buffers), then
//             one fused loop: g = G_t + gz, u = U_t + uz, h = σ(g) u, h̄_t += w h, h_in = drop(h); then the block's
//             share of zd = h_in Adᵀ (a GEMM into this block's partial).
//   backward  the same recompute, bd = (gzd / (1-p)) Ad, and one fused loop for σ'(g), dw, dh = w dH̄ + drop(bd),
//             dg = dh σ'(g) u, du = dh σ(g) with dG_t, dU_t accumulated; then the weight gradients of the block's
//             columns (dAd += gzdᵀ h_in, dBg += s dgᵀ zg, dBu) and the block's shares of dzg = s dg Bg, dzu.
// The block's task is the only writer of its columns of h̄, dG, dU and of the weight gradients (summed tile by tile in
// sorted order); the rank-R results are summed over the blocks in block order at the end. No atomics; the result
// does not depend on the thread count.

#include <cstring>
#include <optional>
#include <tuple>

#include "cpu_common.h"

namespace mixlora_cpu {
namespace {

// One forward tile of one column block, fused elementwise part.
//   gbuf (rows x W): in s zg Bgᵀ, out h_in = drop(h) (the operand of the zd GEMM); ubuf: s zu Buᵀ (GATED).
//   hbar: fp32 (T x I) accumulators, this block's columns [c0, c0 + W).
template <int ACT, bool GATED, bool MASK, typename In>
MIXLORA_CLONES void forward_tile(int64_t rows, int64_t W, int64_t c0, int64_t I, const In* __restrict G,
                                 const In* __restrict U, float* __restrict gbuf, const float* __restrict ubuf,
                                 const int64_t* __restrict tokens, const float* __restrict weights,
                                 const int64_t* __restrict slots, float* __restrict hbar, uint32_t seed,
                                 uint32_t threshold) {
  for (int64_t r = 0; r < rows; ++r) {
    if (kPrefetchRows > 0 && r + kPrefetchRows < rows) {
      const int64_t ahead = tokens[r + kPrefetchRows] * I + c0;
      prefetch_bytes(G + ahead, W * static_cast<int64_t>(sizeof(In)));
      if constexpr (GATED) prefetch_bytes(U + ahead, W * static_cast<int64_t>(sizeof(In)));
    }
    const int64_t t = tokens[r];
    const In* __restrict Gt = G + t * I + c0;
    float* __restrict gr = gbuf + r * W;
    float* __restrict ht = hbar + t * I + c0;
    const float w = weights[r];
    const uint32_t base = hash_base(slots[r], I, c0);
    if constexpr (GATED) {
      const In* __restrict Ut = U + t * I + c0;
      const float* __restrict ur = ubuf + r * W;
      for (int64_t i = 0; i < W; ++i) {
        const float h = act_value<ACT>(load(Gt[i]) + gr[i]) * (load(Ut[i]) + ur[i]);
        ht[i] += w * h;
        if constexpr (MASK) {
          gr[i] = hash32((base + static_cast<uint32_t>(i)) ^ seed) >= threshold ? h : 0.0f;
        } else {
          gr[i] = h;
        }
      }
    } else {
      for (int64_t i = 0; i < W; ++i) {
        const float h = act_value<ACT>(load(Gt[i]) + gr[i]);
        ht[i] += w * h;
        if constexpr (MASK) {
          gr[i] = hash32((base + static_cast<uint32_t>(i)) ^ seed) >= threshold ? h : 0.0f;
        } else {
          gr[i] = h;
        }
      }
    }
  }
}

// Σ_i x[i] in a fixed order: 16 lane sums (a vector register in the AVX-512 clone, two in the AVX2 one, the same
// additions either way), then the lanes and the tail in order.
MIXLORA_INLINE float ordered_sum(const float* __restrict x, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += x[i + l];
  }
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  for (; i < n; ++i) s += x[i];
  return s;
}

// One backward tile of one column block, fused elementwise part.
//   gbuf: in s zg Bgᵀ, out dg;  ubuf: in s zu Buᵀ, out du (GATED);  dbuf: in bd = (gzd/(1-p)) Ad, out h_in (DOWN);
//   pbuf: scratch (W);  dG, dU: fp32 (T x I) accumulators;  dw: (rows) this block's share of ⟨dH̄_t, h_j⟩.
template <int ACT, bool GATED, bool DOWN, bool MASK, typename In>
MIXLORA_CLONES void backward_tile(int64_t rows, int64_t W, int64_t c0, int64_t I, const In* __restrict G,
                                  const In* __restrict U, const In* __restrict GH, float* __restrict gbuf,
                                  float* __restrict ubuf, float* __restrict dbuf, float* __restrict pbuf,
                                  const int64_t* __restrict tokens, const float* __restrict weights,
                                  const int64_t* __restrict slots, float* __restrict dG, float* __restrict dU,
                                  float* __restrict dw, uint32_t seed, uint32_t threshold) {
  for (int64_t r = 0; r < rows; ++r) {
    if (kPrefetchRows > 0 && r + kPrefetchRows < rows) {
      const int64_t ahead = tokens[r + kPrefetchRows] * I + c0;
      prefetch_bytes(G + ahead, W * static_cast<int64_t>(sizeof(In)));
      prefetch_bytes(GH + ahead, W * static_cast<int64_t>(sizeof(In)));
      if constexpr (GATED) prefetch_bytes(U + ahead, W * static_cast<int64_t>(sizeof(In)));
    }
    const int64_t t = tokens[r];
    const In* __restrict Gt = G + t * I + c0;
    const In* __restrict Ut = GATED ? U + t * I + c0 : nullptr;
    const In* __restrict GHt = GH + t * I + c0;
    float* __restrict gr = gbuf + r * W;
    float* __restrict ur = ubuf + r * W;
    float* __restrict dr = dbuf + r * W;
    float* __restrict dGt = dG + t * I + c0;
    float* __restrict dUt = GATED ? dU + t * I + c0 : nullptr;
    const float w = weights[r];
    const uint32_t base = hash_base(slots[r], I, c0);
    for (int64_t i = 0; i < W; ++i) {
      float a, da;
      act_value_grad<ACT>(load(Gt[i]) + gr[i], a, da);
      const float u = GATED ? load(Ut[i]) + ur[i] : 1.0f;
      const float h = GATED ? a * u : a;
      const float gh = load(GHt[i]);
      pbuf[i] = gh * h;
      float dh = w * gh;
      if constexpr (DOWN) {
        float bd = dr[i];
        float h_in = h;
        if constexpr (MASK) {
          const bool keep = hash32((base + static_cast<uint32_t>(i)) ^ seed) >= threshold;
          bd = keep ? bd : 0.0f;
          h_in = keep ? h : 0.0f;
        }
        dh += bd;
        dr[i] = h_in;
      }
      const float dg = GATED ? dh * da * u : dh * da;
      gr[i] = dg;
      dGt[i] += dg;
      if constexpr (GATED) {
        const float du = dh * a;
        ur[i] = du;
        dUt[i] += du;
      }
    }
    dw[r] = ordered_sum(pbuf, W);
  }
}

// buf (rows x W) = s z (rows x R) B_e[cols, :]ᵀ, with B_e[cols, :] the (W x R) rows of the block; zeros at R = 0.
void expand(int64_t rows, int64_t W, int64_t R, float s, const float* z, const float* B, float* buf) {
  if (R > 0) {
    gemm(false, true, rows, W, R, s, z, R, B, R, 0.0f, buf, W);
  } else {
    std::memset(buf, 0, sizeof(float) * rows * W);
  }
}

// The activations in the dtype the loops read (cpu_common.h: loop_dtype), contiguous; undefined for nullptr.
std::vector<at::Tensor> activations(at::ScalarType dtype, std::initializer_list<const at::Tensor*> ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor* t : ts) out.push_back(t == nullptr ? at::Tensor() : t->to(dtype).contiguous());
  return out;
}

void check_inputs(const char* op, const at::Tensor& G, const std::optional<at::Tensor>& U, const at::Tensor& zg,
                  const at::Tensor& Bg, const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                  const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& Ad) {
  for (auto [t, name] : {std::pair{&G, "G"}, {&zg, "zg"}, {&Bg, "Bg"}, {&zu, "zu"}, {&Bu, "Bu"}, {&weights, "weights"},
                         {&Ad, "Ad"}}) {
    check_cpu_float(*t, op, name);
  }
  TORCH_CHECK(G.dim() == 2, "mixlora_cpu::", op, ": G must be (T, I)");
  const int64_t T = G.size(0), I = G.size(1);
  if (U.has_value()) {
    check_cpu_float(*U, op, "U");
    TORCH_CHECK(U->sizes() == G.sizes(), "mixlora_cpu::", op, ": U must have G's shape");
  }
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == T, "mixlora_cpu::", op, ": experts must be (T, K)");
  const int64_t S = experts.numel(), E = Bg.size(0);
  TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == S, "mixlora_cpu::", op, ": order must be int64 (S,)");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == E + 1, "mixlora_cpu::", op,
              ": offsets must be int64 (E+1,)");
  TORCH_CHECK(zg.dim() == 2 && zg.size(0) == S && Bg.dim() == 3 && Bg.size(1) == I && Bg.size(2) == zg.size(1),
              "mixlora_cpu::", op, ": zg (S, Rg) and Bg (E, I, Rg) do not match");
  TORCH_CHECK(zu.dim() == 2 && zu.size(0) == S && Bu.dim() == 3 && Bu.size(0) == E && Bu.size(1) == I &&
                  Bu.size(2) == zu.size(1),
              "mixlora_cpu::", op, ": zu (S, Ru) and Bu (E, I, Ru) do not match");
  TORCH_CHECK(U.has_value() || zu.size(1) == 0, "mixlora_cpu::", op, ": an up LoRA needs U");
  TORCH_CHECK(Ad.dim() == 3 && Ad.size(0) == E && Ad.size(2) == I, "mixlora_cpu::", op, ": Ad must be (E, Rd, I)");
  TORCH_CHECK(weights.sizes() == experts.sizes(), "mixlora_cpu::", op, ": weights must be (T, K)");
  TORCH_CHECK(I < (int64_t{1} << 31) && S < (int64_t{1} << 40), "mixlora_cpu::", op, ": too large");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> expand_act_combine_cpu(
    const at::Tensor& G, const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
    const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights, const at::Tensor& experts,
    const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& Ad, double scale,
    const std::string& activation_name, double dropout_p, int64_t seed) {
  check_inputs("expand_act_combine", G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad);
  const Activation act = parse_activation(activation_name);
  const int64_t T = G.size(0), I = G.size(1), Rg = zg.size(1), Ru = zu.size(1), Rd = Ad.size(1);
  const bool gated = U.has_value();
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, &weights);
  const int64_t S = routing.S;
  const Dropout drop(Rd > 0 ? dropout_p : 0.0, seed);

  const at::ScalarType in_dtype = loop_dtype({&G, gated ? &*U : nullptr});
  const std::vector<at::Tensor> in = activations(in_dtype, {&G, gated ? &*U : nullptr});
  const at::Tensor zg_s = sorted_rows(zg, order, 1.0), zu_s = sorted_rows(zu, order, 1.0);
  const at::Tensor Bg_f = f32(Bg), Bu_f = f32(Bu), Ad_f = f32(Ad);
  const auto opts = G.options().dtype(at::kFloat);
  // h̄ accumulates in fp32: in the output itself for fp32 G, else in a buffer converted at the end.
  at::Tensor hbar = at::empty({T, I}, opts);
  const std::vector<int64_t> blocks = column_blocks(I);
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  at::Tensor zd_part = at::empty({std::max<int64_t>(nblk, 0), S, Rd}, opts);
  const float s = static_cast<float>(scale);
  const float *zg_p = zg_s.data_ptr<float>(), *zu_p = zu_s.data_ptr<float>();
  const float *Bg_p = Bg_f.data_ptr<float>(), *Bu_p = Bu_f.data_ptr<float>(), *Ad_p = Ad_f.data_ptr<float>();
  float* hbar_p = hbar.data_ptr<float>();
  float* zd_part_p = zd_part.data_ptr<float>();

  dispatch_activation(act, [&](auto ACT) {
    dispatch_bool(gated, [&](auto GATED) {
      dispatch_bool(drop.on, [&](auto MASK) {
        dispatch_input(in_dtype, [&](auto in_tag) {
          using In = decltype(in_tag);
          const In* Gp = data_as<In>(in[0]);
          const In* Up = data_as<In>(in[1]);
          at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
            int64_t wmax = 0;
            for (int64_t c = b0; c < b1; ++c) wmax = std::max(wmax, blocks[c + 1] - blocks[c]);
            std::vector<float> scratch(2 * kTileRows * wmax);
            float* gbuf = scratch.data();
            float* ubuf = gbuf + kTileRows * wmax;
            for (int64_t c = b0; c < b1; ++c) {
              const int64_t c0 = blocks[c], W = blocks[c + 1] - c0;
              zero_columns(hbar_p, T, I, c0, W);
              for (const Tile& tile : routing.tiles) {
                const int64_t rows = tile.end - tile.start, e = tile.expert, r0 = tile.start;
                expand(rows, W, Rg, s, zg_p + r0 * Rg, Bg_p + (e * I + c0) * Rg, gbuf);
                if constexpr (GATED) expand(rows, W, Ru, s, zu_p + r0 * Ru, Bu_p + (e * I + c0) * Ru, ubuf);
                forward_tile<ACT, GATED, MASK, In>(rows, W, c0, I, Gp, Up, gbuf, ubuf, routing.tokens.data() + r0,
                                                   routing.weights.data() + r0, routing.order + r0, hbar_p, drop.seed,
                                                   drop.threshold);
                // zd share (rows x Rd) = h_in (rows x W) Ad_e[:, cols]ᵀ
                if (Rd > 0) {
                  gemm(false, true, rows, Rd, W, 1.0f, gbuf, W, Ad_p + e * Rd * I + c0, I, 0.0f,
                       zd_part_p + (c * S + r0) * Rd, Rd);
                }
              }
            }
          });
        });
      });
    });
  });

  // zd_j = (1/(1-p)) Σ_blocks, in block order, scattered from sorted position p to slot order[p].
  at::Tensor zd = at::empty({S, Rd}, opts);
  if (Rd > 0) {
    const float* part = zd_part.data_ptr<float>();
    float* out = zd.data_ptr<float>();
    at::parallel_for(0, S, 256, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* dst = out + routing.order[p] * Rd;
        for (int64_t k = 0; k < Rd; ++k) {
          float s = 0.0f;
          for (int64_t c = 0; c < nblk; ++c) s += part[(c * S + p) * Rd + k];
          dst[k] = s * drop.inv_keep;
        }
      }
    });
  }
  return {G.scalar_type() == at::kFloat ? hbar : hbar.to(G.scalar_type()), zd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expand_act_combine_backward_cpu(const at::Tensor& grad_hbar, const at::Tensor& grad_zd, const at::Tensor& G,
                                const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
                                const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                                const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                const at::Tensor& Ad, double scale, const std::string& activation_name,
                                double dropout_p, int64_t seed) {
  check_inputs("expand_act_combine_backward", G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad);
  check_cpu_float(grad_hbar, "expand_act_combine_backward", "grad_hbar");
  check_cpu_float(grad_zd, "expand_act_combine_backward", "grad_zd");
  TORCH_CHECK(grad_hbar.sizes() == G.sizes(), "mixlora_cpu::expand_act_combine_backward: grad_hbar must be (T, I)");
  TORCH_CHECK(grad_zd.dim() == 2 && grad_zd.size(0) == experts.numel() && grad_zd.size(1) == Ad.size(1),
              "mixlora_cpu::expand_act_combine_backward: grad_zd must be (S, Rd)");
  const Activation act = parse_activation(activation_name);
  const int64_t T = G.size(0), I = G.size(1), Rg = zg.size(1), Ru = zu.size(1), Rd = Ad.size(1);
  const bool gated = U.has_value();
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, &weights);
  const int64_t S = routing.S;
  const Dropout drop(Rd > 0 ? dropout_p : 0.0, seed);

  const at::ScalarType in_dtype = loop_dtype({&G, gated ? &*U : nullptr, &grad_hbar});
  const std::vector<at::Tensor> in = activations(in_dtype, {&G, gated ? &*U : nullptr, &grad_hbar});
  const at::Tensor zg_s = sorted_rows(zg, order, 1.0), zu_s = sorted_rows(zu, order, 1.0);
  const at::Tensor gzd_s = sorted_rows(grad_zd, order, drop.inv_keep);  // the mask's 1/(1-p), on the rank-R side
  const at::Tensor Bg_f = f32(Bg), Bu_f = f32(Bu), Ad_f = f32(Ad);
  const auto opts = G.options().dtype(at::kFloat);
  at::Tensor dG = at::empty({T, I}, opts);
  at::Tensor dU = gated ? at::empty({T, I}, opts) : at::Tensor();
  at::Tensor dBg = at::zeros({Bg.size(0), I, Rg}, opts), dBu = at::zeros({Bu.size(0), I, Ru}, opts);
  at::Tensor dAd = at::zeros({Ad.size(0), Rd, I}, opts);
  const std::vector<int64_t> blocks = column_blocks(I);
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  const int64_t nb = std::max<int64_t>(nblk, 0);
  at::Tensor dzg_part = at::empty({nb, S, Rg}, opts), dzu_part = at::empty({nb, S, Ru}, opts);
  at::Tensor dw_part = at::empty({nb, S}, opts);
  const float s = static_cast<float>(scale);
  const float *zg_p = zg_s.data_ptr<float>(), *zu_p = zu_s.data_ptr<float>(), *gzd_p = gzd_s.data_ptr<float>();
  const float *Bg_p = Bg_f.data_ptr<float>(), *Bu_p = Bu_f.data_ptr<float>(), *Ad_p = Ad_f.data_ptr<float>();
  float *dG_p = dG.data_ptr<float>(), *dU_p = gated ? dU.data_ptr<float>() : nullptr;
  float *dBg_p = dBg.data_ptr<float>(), *dBu_p = dBu.data_ptr<float>(), *dAd_p = dAd.data_ptr<float>();
  float *dzg_part_p = dzg_part.data_ptr<float>(), *dzu_part_p = dzu_part.data_ptr<float>();
  float* dw_part_p = dw_part.data_ptr<float>();

  dispatch_activation(act, [&](auto ACT) {
    dispatch_bool(gated, [&](auto GATED) {
      dispatch_bool(Rd > 0, [&](auto DOWN) {
        dispatch_bool(drop.on, [&](auto MASK) {
          if constexpr (MASK && !DOWN) {
            return;  // unreachable: the mask is on only with a down LoRA
          } else {
            dispatch_input(in_dtype, [&](auto in_tag) {
              using In = decltype(in_tag);
              const In* Gp = data_as<In>(in[0]);
              const In* Up = data_as<In>(in[1]);
              const In* GHp = data_as<In>(in[2]);
              at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
                int64_t wmax = 0;
                for (int64_t c = b0; c < b1; ++c) wmax = std::max(wmax, blocks[c + 1] - blocks[c]);
                std::vector<float> scratch(3 * kTileRows * wmax + wmax);
                float* gbuf = scratch.data();
                float* ubuf = gbuf + kTileRows * wmax;
                float* dbuf = ubuf + kTileRows * wmax;
                float* pbuf = dbuf + kTileRows * wmax;
                for (int64_t c = b0; c < b1; ++c) {
                  const int64_t c0 = blocks[c], W = blocks[c + 1] - c0;
                  zero_columns(dG_p, T, I, c0, W);
                  if constexpr (GATED) zero_columns(dU_p, T, I, c0, W);
                  for (const Tile& tile : routing.tiles) {
                    const int64_t rows = tile.end - tile.start, e = tile.expert, r0 = tile.start;
                    const float* Bg_e = Bg_p + (e * I + c0) * Rg;  // Bg_e[cols, :] (W x Rg)
                    const float* Bu_e = Bu_p + (e * I + c0) * Ru;
                    const float* Ad_e = Ad_p + e * Rd * I + c0;     // Ad_e[:, cols] (Rd x W, ld I)
                    expand(rows, W, Rg, s, zg_p + r0 * Rg, Bg_e, gbuf);
                    if constexpr (GATED) expand(rows, W, Ru, s, zu_p + r0 * Ru, Bu_e, ubuf);
                    // bd (rows x W) = (gzd/(1-p)) (rows x Rd) Ad_e[:, cols]
                    if constexpr (DOWN) gemm(false, false, rows, W, Rd, 1.0f, gzd_p + r0 * Rd, Rd, Ad_e, I, 0.0f, dbuf, W);
                    backward_tile<ACT, GATED, DOWN, MASK, In>(
                        rows, W, c0, I, Gp, Up, GHp, gbuf, ubuf, dbuf, pbuf, routing.tokens.data() + r0,
                        routing.weights.data() + r0, routing.order + r0, dG_p, dU_p, dw_part_p + c * S + r0,
                        drop.seed, drop.threshold);
                    // dAd_e[:, cols] += gzdᵀ (Rd x rows) h_in (rows x W)
                    if constexpr (DOWN) gemm(true, false, Rd, W, rows, 1.0f, gzd_p + r0 * Rd, Rd, dbuf, W, 1.0f, dAd_p + e * Rd * I + c0, I);
                    if (Rg > 0) {
                      // dzg share (rows x Rg) = dg (rows x W) Bg_e[cols, :];  dBg_e[cols, :] += s dgᵀ zg
                      gemm(false, false, rows, Rg, W, 1.0f, gbuf, W, Bg_e, Rg, 0.0f, dzg_part_p + (c * S + r0) * Rg, Rg);
                      gemm(true, false, W, Rg, rows, s, gbuf, W, zg_p + r0 * Rg, Rg, 1.0f, dBg_p + (e * I + c0) * Rg, Rg);
                    }
                    if constexpr (GATED) {
                      if (Ru > 0) {
                        gemm(false, false, rows, Ru, W, 1.0f, ubuf, W, Bu_e, Ru, 0.0f, dzu_part_p + (c * S + r0) * Ru, Ru);
                        gemm(true, false, W, Ru, rows, s, ubuf, W, zu_p + r0 * Ru, Ru, 1.0f, dBu_p + (e * I + c0) * Ru, Ru);
                      }
                    }
                  }
                }
              });
            });
          }
        });
      });
    });
  });

  // Rank-R results: Σ over the blocks in block order, scattered from sorted position p to slot order[p].
  at::Tensor dzg = at::empty({S, Rg}, opts), dzu = at::empty({S, Ru}, opts), dw = at::empty({S}, opts);
  {
    const float *pg = dzg_part.data_ptr<float>(), *pu = dzu_part.data_ptr<float>(), *pw = dw_part.data_ptr<float>();
    float *og = dzg.data_ptr<float>(), *ou = dzu.data_ptr<float>(), *ow = dw.data_ptr<float>();
    at::parallel_for(0, S, 256, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j = routing.order[p];
        for (int64_t k = 0; k < Rg; ++k) {
          float acc = 0.0f;
          for (int64_t c = 0; c < nblk; ++c) acc += pg[(c * S + p) * Rg + k];
          og[j * Rg + k] = s * acc;
        }
        for (int64_t k = 0; k < Ru; ++k) {
          float acc = 0.0f;
          for (int64_t c = 0; c < nblk; ++c) acc += pu[(c * S + p) * Ru + k];
          ou[j * Ru + k] = s * acc;
        }
        float acc = 0.0f;
        for (int64_t c = 0; c < nblk; ++c) acc += pw[c * S + p];
        ow[j] = acc;
      }
    });
  }
  at::Tensor dU_out = gated ? like(dU, *U) : at::empty({0}, G.options());
  return {like(dG, G), dU_out, like(dzg, zg), like(dBg, Bg), like(dzu, zu), like(dBu, Bu),
          like(dw.view(weights.sizes()), weights), like(dAd, Ad)};
}

}  // namespace mixlora_cpu
