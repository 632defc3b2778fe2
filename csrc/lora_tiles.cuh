// The tensor-core kernels of lora_shrink and lora_expand_combine (forward and backward). Both ops are rank-R
// products of expert-stacked weights with token rows, so three kernels serve their six launches; each weight is
// read through a view W (E, R, H) of element (e, r, h) at e * s_e + r * s_r + h * s_h: A (E, R, H) as it is,
// B (E, H, R) as its transpose.
//
//   slot_rank_mma_kernel   per-slot rank vectors out_j = scale * W_e x_t(j) (reduction over H):
//                          lora_shrink's z (x masked by dropout) and lora_expand_combine's q_j = s B_e^T dy_t
//                          (then dzd_j = w_j q_j and dw_j = <q_j, zd_j>).
//                          Block = 64 consecutive positions of one expert's segment of the sorted order
//                          (find_segment_tile) x 64 rank columns; grid (ceil(S/64) + E, rank tiles).
//   token_fold_mma_kernel  per-token rows out_t = scale * sum_k mask_j (W_e^T (w_j v_j)) (reduction over ranks):
//                          lora_shrink's dx (v = dz, dropout mask per slot) and lora_expand_combine's y (v = zd,
//                          routing weights w_j). The expert fold: a token's K rank vectors sit in their experts'
//                          blocks of one E*R-wide row, which one MMA chain multiplies with every expert's stacked
//                          weight rows (64 of the E*R fold rows per staged chunk); with a dropout mask, one such
//                          pass per slot k, masked as it is added. Block = 64 tokens x plan.h_tiles tiles of 64
//                          columns h; grid (ceil(H / (64 h_tiles)), ceil(T/64)). Where the whole fold (every pass's)
//                          fits in shared memory (plan_token_fold), it is built once per block and serves all of
//                          the block's column tiles; otherwise h_tiles = 1 and it is built per 64-column chunk.
//   weight_grad_mma_kernel the segmented weight gradient dW_e = scale * sum_{j -> e} (w_j v_j) x_t(j)^T: lora_shrink's
//                          dA (x masked) and lora_expand_combine's dB (w_j, dy_t). Block = (64 columns h, expert e,
//                          64 ranks); it walks the expert's slots in sorted order, 64 per chunk; every block writes
//                          its tile (zeros for an empty expert). Grid (ceil(H/64), E, rank tiles).
//
// Operands are staged in shared memory as bf16 planes of 64 x 64 (kTerms: the terms of the op's products' precision
// dot_t, shrink_dot_t / expand_dot_t as the Triton kernels' mma_dtype: 1 plane for bf16, 2 for fp16, 3 for an fp32
// model, whose products are exact; the fp32 rank vectors and grad_y of a 16-bit model are rounded to it) and
// multiplied on the tensor cores (mma_terms: ldmatrix, with .trans for K-major planes, and mma.sync m16n8k16 bf16)
// into fp32 accumulator tiles (each warp owns 2 of the tile's 16 tiles of 16 x 16). The fp32 result is staged over
// the planes for the epilogue (token_fold: over the weight chunk's, the fold stays).
// Dropout keeps or zeroes an operand element (exact) and its 1 / (1 - p) scales the result. Deterministic: fixed
// summation orders, no atomics. 32-bit index math (api.cpp checks the weights' span and S < 2^31), 64-bit only for
// the offsets of (T, *) rows. 256 threads, dynamic shared memory lora_tile_smem_bytes (token_fold: TokenFoldSmem;
// opted into above 48 KiB).
// Each kernel is compiled per LoraVariant (dropout on or off, all staged rows aligned or not, the weight's layout),
// so that a launch runs code without the branches of the others.
// __launch_bounds__(256, 1): with the block size alone ptxas held some instances to 80 registers and spilled.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>

#include "common.cuh"
#include "tensor_core.cuh"

namespace mixlora {
namespace {

constexpr int kTile = 64;                 // output rows and columns of a block, and the depth of one staged chunk
constexpr int kTileLd = kTile + 8;        // bf16 plane rows: 144 bytes (ldmatrix: a multiple of 16 bytes)
constexpr int kPlane = kTile * kTileLd;   // elements of one plane (9216 bytes: 128-byte aligned planes)
constexpr int kStageLd = kTile + 4;       // the fp32 result stage
constexpr int kTileFrags = (kTile / 16) * (kTile / 16) / kWarps;  // accumulator fragments per warp: 2

// Bytes of `planes` bf16 planes, or of the fp32 stage laid over them if that is larger.
__host__ __device__ constexpr int lora_tile_planes_bytes(int planes) {
  return planes * kPlane * 2 > kTile * kStageLd * 4 ? planes * kPlane * 2 : kTile * kStageLd * 4;
}

// Dynamic shared memory of a launch: the planes, then `words` 32-bit words of per-row state.
__host__ __device__ constexpr size_t lora_tile_smem_bytes(int planes, int words) {
  return static_cast<size_t>(lora_tile_planes_bytes(planes)) + static_cast<size_t>(words) * 4;
}

// Dynamic shared memory and grids of the three kernels (shared by the launches and the CPU harness's mirrors).
template <typename x_t, typename w_t, typename dot_t>
constexpr size_t slot_rank_smem_bytes() {
  return lora_tile_smem_bytes(kTerms<x_t, dot_t> + kTerms<w_t, dot_t>, 4 * kTile);
}
// How a token_fold_mma_kernel launch holds its expert fold: `fold_rows` fold columns at a time (a multiple of
// kTile), `slots` copies of them (one per pass when whole, else one per pass of a group), `h_tiles` column tiles
// per block (> 1 only when whole: the fold is built once and reused), `smem` bytes of dynamic shared memory
// (TokenFoldSmem's layout).
struct TokenFoldPlan {
  int fold_rows, slots, h_tiles;
  bool whole;
  size_t smem;
};

// The shared memory of token_fold_mma_kernel: the fold (slots x NV bf16 planes of 64 rows x fold_rows + 8), then the
// weight chunk (NW planes of 64 x 72, the fp32 result stage laid over them), then the per-fold-column expert, rank
// and weight offset and the tile's K experts per token (32-bit words). Offsets in bytes, 128-byte aligned.
struct TokenFoldSmem {
  int fold_ld, fold_plane, weights, words;
  size_t bytes;
  __host__ __device__ TokenFoldSmem(int nv, int nw, int fold_rows, int slots, int64_t K) {
    fold_ld = fold_rows + 8;
    fold_plane = kTile * fold_ld;
    weights = (slots * nv * fold_plane * 2 + 127) / 128 * 128;
    words = weights + lora_tile_planes_bytes(nw);
    bytes = static_cast<size_t>(words) + 4 * static_cast<size_t>(3 * fold_rows + kTile * K);
  }
};

// Host side: the whole fold (E * R columns, rounded up to kTile) when every pass's copy fits in sm_90's 227 KiB per
// block, with up to 8 column tiles per block sharing it while the grid keeps about two blocks per SM (`sms`: the
// device's multiprocessors); otherwise 64 fold columns at a time, rebuilt per chunk and column tile.
template <typename w_t, typename dot_t>
TokenFoldPlan plan_token_fold(int64_t T, int64_t H, int64_t E, int64_t R, int64_t K, bool drop, int64_t sms) {
  constexpr int NV = kTerms<float, dot_t>;
  constexpr int NW = kTerms<w_t, dot_t>;
  const int64_t whole_rows = (E * R + kTile - 1) / kTile * kTile;
  const int passes = drop ? static_cast<int>(K) : 1;
  if (whole_rows <= 4096) {
    const int rows = static_cast<int>(whole_rows);
    const size_t bytes = TokenFoldSmem(NV, NW, rows, passes, K).bytes;
    if (bytes <= size_t{227} * 1024) {
      const int64_t col_tiles = (H + kTile - 1) / kTile;
      const int64_t tiles = col_tiles * ((T + kTile - 1) / kTile);
      const int64_t per_block = tiles / (2 * (sms < 1 ? 1 : sms));
      const int h_tiles = static_cast<int>(per_block < 1 ? 1 : per_block > 8 ? 8 : per_block);
      return {rows, passes, h_tiles, true, bytes};
    }
  }
  const int slots = drop && K > 1 ? 2 : 1;  // the kernel's pass group (kGroup) when it rebuilds the fold per chunk
  return {kTile, slots, 1, false, TokenFoldSmem(NV, NW, kTile, slots, K).bytes};
}
template <typename x_t, typename dot_t>
constexpr size_t weight_grad_smem_bytes() {
  return lora_tile_smem_bytes(kTerms<x_t, dot_t> + kTerms<float, dot_t>, 3 * kTile);
}
// Host side: whether stage_weight_rows moves W 8 elements per load: rows along h aligned (s_h == 1), or (s_r == 1)
// ranks in runs of 8 of one expert, aligned.
template <typename T>
bool weight_rows_aligned(const T* W, int64_t s_e, int64_t s_r, int64_t s_h, int64_t R) {
  return s_h == 1 ? rows_aligned(W, {s_e, s_r}) : s_r == 1 && R % 8 == 0 && rows_aligned(W, {s_e, s_h});
}

// rank_tiles: 1 (a block loops over all ranks) or ceil(R / 64).
inline dim3 slot_rank_grid(int64_t S, int64_t E, int64_t rank_tiles) {
  return dim3(static_cast<unsigned int>((S + kTile - 1) / kTile + E), static_cast<unsigned int>(rank_tiles));
}
inline dim3 token_fold_grid(int64_t T, int64_t H, const TokenFoldPlan& plan) {
  const int64_t cols = plan.h_tiles * int64_t{kTile};
  return dim3(static_cast<unsigned int>((H + cols - 1) / cols), static_cast<unsigned int>((T + kTile - 1) / kTile));
}
inline dim3 weight_grad_grid(int64_t H, int64_t E, int64_t R) {
  return dim3(static_cast<unsigned int>((H + kTile - 1) / kTile), static_cast<unsigned int>(E),
              static_cast<unsigned int>((R + kTile - 1) / kTile));
}

// The compile-time facts of a launch, so that its kernel holds only the code it runs: dropout on (DROP); every row
// it stages 16-byte aligned, H a multiple of 8, and R too where ranks are staged 8 at a time (VEC: every 8-element
// run is whole or absent, so no alignment tests and no per-element loads in the kernel; otherwise each operand's
// vec_* flag decides at run time); the weight view's elements consecutive along h (H_ROWS: A (E, R, H), s_h = 1)
// or along r (B (E, H, R), s_r = 1). `dispatch_variant` picks it on the host.
// weight_grad_mma_kernel stages no weight and ignores H_ROWS.
template <bool DROP, bool VEC, bool H_ROWS>
struct LoraVariant {
  static constexpr bool kDrop = DROP;
  static constexpr bool kVec = VEC;
  static constexpr bool kHRows = H_ROWS;
};

// Host side: calls f(LoraVariant<DROP, VEC, H_ROWS>{}) for a launch with dropout `drop` (only DROP = false is
// compiled for an op without dropout, MAY_DROP false) whose staged rows are all aligned (`vec`).
template <bool MAY_DROP, bool H_ROWS, typename F>
void dispatch_variant(bool drop, bool vec, F f) {
  auto with_vec = [&](auto d) {
    constexpr bool kDrop = decltype(d)::value;
    vec ? f(LoraVariant<kDrop, true, H_ROWS>{}) : f(LoraVariant<kDrop, false, H_ROWS>{});
  };
  if constexpr (MAY_DROP) {
    drop ? with_vec(std::true_type{}) : with_vec(std::false_type{});
  } else {
    with_vec(std::false_type{});
  }
}

// Fragment i of a warp's kTileFrags among the 4 x 4 fragments of the 64 x 64 tile: f = warp + 8 i is row fragment
// f % 4 and column fragment f / 4, so that narrow rank tiles (R <= 32: column fragments 0, 1) keep all 8 warps busy.
__device__ __forceinline__ int tile_frag_row(int i) {
  return (static_cast<int>(threadIdx.x) / 32 + kWarps * i) % (kTile / 16);
}
__device__ __forceinline__ int tile_frag_col(int i) {
  return (static_cast<int>(threadIdx.x) / 32 + kWarps * i) / (kTile / 16);
}

// v[0..8) = src[0..n) as floats, zeros after (n clamped to [0, 8]): 16-byte loads when `vec` (16-byte aligned rows)
// and all 8 exist. RUNS8 (LoraVariant's VEC): src is 16-byte aligned and n a multiple of 8, so the 8 exist or none
// do, and no per-element path is compiled.
template <bool RUNS8, typename T>
__device__ __forceinline__ void load8(const T* __restrict__ src, int n, bool vec, float (&v)[8]) {
  if (RUNS8 || (vec && n >= 8)) {
    if (RUNS8 && n <= 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v[k] = 0.0f;
      }
      return;
    }
    if constexpr (sizeof(T) == 2) {
      const uint4 u = *reinterpret_cast<const uint4*>(src);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v[k] = static_cast<float>(e[k]);
      }
    } else {
      const float4 a = reinterpret_cast<const float4*>(src)[0];
      const float4 b = reinterpret_cast<const float4*>(src)[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    v[k] = k < n ? static_cast<float>(src[k]) : 0.0f;
  }
}

// Writes v[0..8) as N bf16 terms (store_bf16_terms), 16 bytes per plane; dst is 16-byte aligned.
template <int N>
__device__ __forceinline__ void store8_bf16_terms(float (&v)[8], __nv_bfloat16* dst, int plane) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    alignas(16) __nv_bfloat16 t[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      t[k] = __float2bfloat16_rn(v[k]);
      v[k] -= __bfloat162float(t[k]);
    }
    *reinterpret_cast<uint4*>(dst + i * plane) = *reinterpret_cast<const uint4*>(t);
  }
}

// dst[0..n) = scale * v[0..n) in dst's type T (n clamped to [0, 8]). RUNS8 (LoraVariant's VEC): dst is 16-byte
// aligned and n a multiple of 8: 16-byte stores.
template <bool RUNS8, typename T>
__device__ __forceinline__ void store8(T* __restrict__ dst, int n, float scale, const float (&v)[8]) {
  if constexpr (RUNS8) {
    if (n <= 0) {
      return;
    }
    alignas(16) T t[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      t[k] = static_cast<T>(scale * v[k]);
    }
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(t) / 16); ++i) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(t)[i];
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k < n) {
        dst[k] = static_cast<T>(scale * v[k]);
      }
    }
  }
}

// src[0..8) as bf16 bits, two per 32-bit word (element 2i in the low half of word i), zeros from n on (n clamped to
// [0, 8]): one 16-byte load when vec and all 8 exist. RUNS8: as load8's.
template <bool RUNS8>
__device__ __forceinline__ uint4 load8_bits(const c10::BFloat16* __restrict__ src, int n, bool vec) {
  if (RUNS8 || (vec && n >= 8)) {
    return RUNS8 && n <= 0 ? uint4{0u, 0u, 0u, 0u} : *reinterpret_cast<const uint4*>(src);
  }
  const auto word = [&](int i) {
    return (2 * i < n ? uint32_t{src[2 * i].x} : 0u) | (2 * i + 1 < n ? uint32_t{src[2 * i + 1].x} << 16 : 0u);
  };
  return uint4{word(0), word(1), word(2), word(3)};
}

// v[0..8), values of a T operand, rounded to the products' precision dot_t and written as its kTerms<T, dot_t> bf16
// terms (store8_bf16_terms); dst is 16-byte aligned.
template <typename T, typename dot_t>
__device__ __forceinline__ void store8_terms(float (&v)[8], __nv_bfloat16* dst, int plane) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    v[k] = to_dot<dot_t>(v[k]);
  }
  store8_bf16_terms<kTerms<T, dot_t>>(v, dst, plane);
}

// dst[i * plane + k] = term i of src[k] (store8_terms) for k < 8: zero from n on (n clamped to [0, 8]) and where
// keep(k) is false; dst is 16-byte aligned. bf16 values move as their bits. RUNS8: as load8's.
template <typename dot_t, bool RUNS8, typename T, typename Keep>
__device__ __forceinline__ void stage8(const T* __restrict__ src, int n, bool vec, Keep keep, __nv_bfloat16* dst,
                                       int plane) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // one bf16 term at any dot_t
    // the bits of the kept elements 2i, 2i + 1 in word i
    const auto kept = [&](int i) { return (keep(2 * i) ? 0x0000ffffu : 0u) | (keep(2 * i + 1) ? 0xffff0000u : 0u); };
    const uint4 u = load8_bits<RUNS8>(src, n, vec);
    *reinterpret_cast<uint4*>(dst) = uint4{u.x & kept(0), u.y & kept(1), u.z & kept(2), u.w & kept(3)};
  } else {
    float v[8];
    load8<RUNS8>(src, n, vec, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[k] = keep(k) ? v[k] : 0.0f;
    }
    store8_terms<T, dot_t>(v, dst, plane);
  }
}

// Stages chunk [row][c] = x[row_off[row] + h0 + c] (the token row of slot slots[row]) into kTerms<x_t, dot_t> bf16
// planes (stage8): zero where slots[row] < 0, h0 + c >= H, or dropout drops element (slot, h0 + c) of the (S, H)
// mask. A thread moves 8 consecutive columns of 2 rows; vec: x's rows are 16-byte aligned (always, in a V::kVec
// launch).
template <typename dot_t, typename V, typename x_t>
__device__ __forceinline__ void stage_token_rows(__nv_bfloat16* planes, const int* slots, const int64_t* row_off,
                                                 const x_t* __restrict__ x, int H, int h0, const Dropout& drop,
                                                 bool vec) {
  const int c = static_cast<int>(threadIdx.x) % 8 * 8;
#pragma unroll
  for (int q = 0; q < kTile * 8 / kBlock; ++q) {
    const int row = static_cast<int>(threadIdx.x) / 8 + q * (kBlock / 8);
    const int slot = slots[row];
    stage8<dot_t, V::kVec>(x + row_off[row] + h0 + c, slot < 0 ? 0 : H - h0 - c, V::kVec || vec,
                           [&](int k) { return dropout_keep(drop, slot, H, h0 + c + k); }, planes + row * kTileLd + c,
                           kPlane);
  }
}

// The per-row state of stage_token_rows, by thread tid < 64 for row tid: the slot at sorted position pos0 + tid
// (-1 from position pos0 + n on) and its token's row offset in x (0 for none).
__device__ __forceinline__ void load_row_slot(const int64_t* __restrict__ order, int64_t pos0, int n, int S, int K,
                                              int64_t x_stride, int* slots, int64_t* row_off) {
  const int tid = static_cast<int>(threadIdx.x);
  int slot = -1;
  if (tid < n) {
    const int64_t s = order[pos0 + tid];
    CUDA_KERNEL_ASSERT(s >= 0 && s < S && "lora: order holds a slot id out of range");
    slot = static_cast<int>(s);
  }
  slots[tid] = slot;
  row_off[tid] = slot < 0 ? 0 : static_cast<int64_t>(slot / K) * x_stride;
}

// Where stage_weight_rows puts element (n, c) of its chunk in a plane: W's runs of consecutive elements stay
// consecutive, so that they move 16 bytes at a time: at row n (V::kHRows: W's elements run along h, c) or at row c
// (along the ranks, n).
template <typename V>
__device__ __forceinline__ int chunk_at(int n, int c) {
  return V::kHRows ? n * kTileLd + c : c * kTileLd + n;
}
// Whether that chunk as a B operand whose k runs along c (K_ALONG_C: W^T, h x ranks) or along n (W, ranks x h) is
// K-major (mma_terms): the operand starts at chunk_at(n0, c0), and one 16-deep k step is chunk_at(0, 16) or
// chunk_at(16, 0).
template <typename V, bool K_ALONG_C>
constexpr bool kChunkKMajor = V::kHRows != K_ALONG_C;

// Stages rows [0, nrows) of chunk (n, c) = W[base(n) + (h0 + c) * s_h] into kTerms<w_t, dot_t> bf16 planes at
// chunk_at (stage8; zero where base(n) < 0 or h0 + c >= H; rows from nrows on, a multiple of 16, are left as they
// are: the caller's MMAs do not read them). V::kHRows: s_h = 1; vec: weight_rows_aligned (always, in a V::kVec
// launch).
template <typename dot_t, typename V, typename w_t, typename RowBase>
__device__ __forceinline__ void stage_weight_rows(__nv_bfloat16* planes, const w_t* __restrict__ W, int s_h, int H,
                                                  int h0, int nrows, bool vec, RowBase base) {
  vec = V::kVec || vec;
  if constexpr (V::kHRows) {
    const int c = static_cast<int>(threadIdx.x) % 8 * 8;
#pragma unroll 1  // at most 2 trips (nrows <= 64)
    for (int row = static_cast<int>(threadIdx.x) / 8; row < nrows; row += kBlock / 8) {
      const int b = base(row);
      stage8<dot_t, V::kVec>(W + (b < 0 ? 0 : b) + h0 + c, b < 0 ? 0 : H - h0 - c, vec, [](int) { return true; },
                             planes + row * kTileLd + c, kPlane);
    }
    return;
  }
  // A thread moves rows n0 .. n0 + 7 of columns c, c + kBlock / 2^gshift, ...: 2^gshift >= nrows / 8 threads per
  // column, so that no lane idles at small ranks; with vec one 16-byte load (W's rows n are unit stride apart in
  // runs of 8, aligned), else 8 loads.
  const int gshift = nrows <= 16 ? 1 : nrows <= 32 ? 2 : 3;
  const int tid = static_cast<int>(threadIdx.x);
  const int n0 = (tid & ((1 << gshift) - 1)) * 8;
  if (n0 < nrows) {
    int b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      b[i] = base(n0 + i);
    }
#pragma unroll 1
    for (int c = tid >> gshift; c < kTile; c += kBlock >> gshift) {
      __nv_bfloat16* dst = planes + chunk_at<V>(n0, c);
      if (vec) {
        stage8<dot_t, true>(W + (b[0] < 0 ? 0 : b[0]) + (h0 + c) * s_h, b[0] < 0 || h0 + c >= H ? 0 : 8, true,
                            [](int) { return true; }, dst, kPlane);
      } else {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          v[i] = (b[i] >= 0 && h0 + c < H) ? static_cast<float>(W[b[i] + (h0 + c) * s_h]) : 0.0f;
        }
        store8_terms<w_t, dot_t>(v, dst, kPlane);
      }
    }
  }
}

// The warp's accumulators into the fp32 stage [row][column] (fragments `active` says the warp computed).
template <typename Active>
__device__ __forceinline__ void store_tile(float* stage, SplitAcc (&acc)[kTileFrags], Active active) {
#pragma unroll
  for (int i = 0; i < kTileFrags; ++i) {
    if (active(i)) {
      acc[i].store(stage + tile_frag_row(i) * 16 * kStageLd + tile_frag_col(i) * 16, kStageLd);
    }
  }
}

template <typename x_t, typename w_t>
struct SlotRankArgs {
  const x_t* x;  // (T, H) token rows: x (shrink) or dy (expand backward)
  int64_t x_stride;
  const w_t* W;  // view (E, R, H)
  int s_e, s_r, s_h;
  const int64_t* order;
  const int64_t* offsets;
  int E, S, K, H, R;
  Dropout drop;  // on x (shrink); inactive otherwise
  float scale;
  bool vec_x, vec_w;          // rows_aligned(x), weight_rows_aligned(W)
  float* out;                 // (S, R) contiguous
  const float* row_weights;   // nullptr, or (S,) w_j: out_j = w_j * scale * W_e x_t
  const float* zd;            // with dweights: dweights_j = <scale * W_e x_t, zd_j>
  int64_t zd_stride;
  float* dweights;            // nullptr: none (then gridDim.y may split the ranks)

  bool aligned() const { return vec_x && vec_w && H % 8 == 0; }  // LoraVariant's VEC
};

template <typename x_t, typename w_t, typename dot_t, typename V>
__global__ void __launch_bounds__(kBlock, 1) slot_rank_mma_kernel(const SlotRankArgs<x_t, w_t> p) {
  constexpr int NX = kTerms<x_t, dot_t>;
  constexpr int NW = kTerms<w_t, dot_t>;
  const Dropout drop = static_dropout<V::kDrop>(p.drop);
  unsigned char* sm = dynamic_smem<unsigned char>();
  __nv_bfloat16* xs = smem_at<__nv_bfloat16>(sm, 0);
  __nv_bfloat16* ws = xs + NX * kPlane;
  float* stage = smem_at<float>(sm, 0);
  int64_t* row_off = smem_at<int64_t>(sm, lora_tile_planes_bytes(NX + NW));
  int* row_slot = smem_at<int>(sm, lora_tile_planes_bytes(NX + NW) + kTile * 8);
  float* row_dw = smem_at<float>(sm, lora_tile_planes_bytes(NX + NW) + kTile * 12);
  int64_t expert, start, end;
  if (!find_segment_tile(p.offsets, p.E, blockIdx.x, kTile, expert, start, end)) {
    return;
  }
  const int e = static_cast<int>(expert);
  const int rows = static_cast<int>(end - start);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < kTile) {
    load_row_slot(p.order, start, rows, p.S, p.K, p.x_stride, row_slot, row_off);
    row_dw[tid] = 0.0f;
  }
  __syncthreads();
  const int rank_step = static_cast<int>(gridDim.y) * kTile;
  for (int rank0 = static_cast<int>(blockIdx.y) * kTile; rank0 < p.R; rank0 += rank_step) {
    const int ncols = p.R - rank0 < kTile ? p.R - rank0 : kTile;
    const int nrows = round16(ncols);  // weight rows the MMAs read
    const auto active = [&](int i) { return tile_frag_row(i) * 16 < rows && tile_frag_col(i) * 16 < ncols; };
    SplitAcc acc[kTileFrags];
#pragma unroll
    for (int i = 0; i < kTileFrags; ++i) {
      acc[i].zero();
    }
    for (int h0 = 0; h0 < p.H; h0 += kTile) {
      stage_token_rows<dot_t, V>(xs, row_slot, row_off, p.x, p.H, h0, drop, p.vec_x);
      stage_weight_rows<dot_t, V>(ws, p.W, p.s_h, p.H, h0, nrows, p.vec_w,
                            [&](int n) { return rank0 + n < p.R ? e * p.s_e + (rank0 + n) * p.s_r : -1; });
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kTileFrags; ++i) {
        if (active(i)) {  // out (rows x ranks) = x (rows x h) . W^T (h x ranks)
          mma_terms<NX, NW, false, kChunkKMajor<V, true>, kTile / 16>(
              acc[i], {xs + tile_frag_row(i) * 16 * kTileLd, 16, kPlane, kTileLd},
              {ws + chunk_at<V>(tile_frag_col(i) * 16, 0), chunk_at<V>(0, 16), kPlane, kTileLd});
        }
      }
      __syncthreads();
    }
    store_tile(stage, acc, active);
    __syncthreads();
    for (int idx = tid; idx < kTile * kTile; idx += kBlock) {
      const int row = idx / kTile;
      const int c = idx % kTile;
      const int slot = row_slot[row];
      if (slot >= 0 && c < ncols) {
        const float q = p.scale * stage[row * kStageLd + c];
        p.out[static_cast<int64_t>(slot) * p.R + rank0 + c] = p.row_weights ? p.row_weights[slot] * q : q;
      }
    }
    if (p.dweights && tid < rows) {
      const float* z = p.zd + static_cast<int64_t>(row_slot[tid]) * p.zd_stride + rank0;
      float dw = row_dw[tid];
      for (int c = 0; c < ncols; ++c) {
        dw = fmaf(p.scale * stage[tid * kStageLd + c], z[c], dw);
      }
      row_dw[tid] = dw;
    }
    __syncthreads();  // the stage is the next rank tile's planes
  }
  if (p.dweights && tid < rows) {
    p.dweights[row_slot[tid]] = row_dw[tid];
  }
}

template <typename w_t, typename out_t>
struct TokenFoldArgs {
  const float* v;  // (S, R) slot rank vectors: dz (shrink backward) or zd (expand)
  int64_t v_stride;
  const float* row_weights;  // nullptr, or (S,) w_j multiplying v_j
  const int64_t* experts;    // (T, K)
  const w_t* W;              // view (E, R, H)
  int s_e, s_r, s_h;
  int E, T, K, H, R;
  Dropout drop;  // mask of element (j, h) of the (S, H) slot products (shrink backward); inactive otherwise
  float scale;
  bool vec_w;  // weight_rows_aligned(W)
  bool vec_v;  // R % 8 == 0 and rows_aligned(v)
  out_t* out;  // (T, H) contiguous
  TokenFoldPlan plan;

  // LoraVariant's VEC (out, a fresh contiguous (T, H) tensor, then has 16-byte aligned rows too)
  bool aligned() const { return vec_w && vec_v && H % 8 == 0; }
};

// WHOLE (plan.whole, a compile-time fact so that each instance holds one fold schedule): every pass's whole fold is
// built once, before the column tiles; otherwise h_tiles = 1 and the fold is built per 64-column chunk of it.
template <typename w_t, typename out_t, typename dot_t, typename V, bool WHOLE>
__global__ void __launch_bounds__(kBlock, 1) token_fold_mma_kernel(const TokenFoldArgs<w_t, out_t> p) {
  constexpr int NV = kTerms<float, dot_t>;
  constexpr int NW = kTerms<w_t, dot_t>;
  constexpr int kOutRows = kTile * kTile / (8 * kBlock);  // outputs per thread: columns c8 .. c8 + 7 of rows
                                                         // tid / 8 + 32 q, q < 2
  const Dropout drop = static_dropout<V::kDrop>(p.drop);
  const int FG = p.plan.fold_rows;
  const int h_tiles = p.plan.h_tiles;
  const TokenFoldSmem L(NV, NW, FG, p.plan.slots, p.K);
  unsigned char* sm = dynamic_smem<unsigned char>();
  __nv_bfloat16* folds = smem_at<__nv_bfloat16>(sm, 0);  // slot s at s * NV * fold_plane
  __nv_bfloat16* ws = smem_at<__nv_bfloat16>(sm, L.weights);
  float* stage = smem_at<float>(sm, L.weights);
  int* fold_e = smem_at<int>(sm, L.words);  // expert, rank, weight offset of fold column g0 + n
  int* fold_r = fold_e + FG;
  int* fold_base = fold_r + FG;
  int* tok_expert = fold_base + FG;  // [row * K + k]
  const int tid = static_cast<int>(threadIdx.x);
  const int t0 = static_cast<int>(blockIdx.y) * kTile;
  const int rows = p.T - t0 < kTile ? p.T - t0 : kTile;
  const int64_t E = p.E;
  for (int i = tid; i < kTile * p.K; i += kBlock) {
    int64_t e = -1;
    if (i < rows * p.K) {
      e = p.experts[static_cast<int64_t>(t0) * p.K + i];
      CUDA_KERNEL_ASSERT(e >= 0 && e < E && "lora: expert id out of range [0, E)");
    }
    tok_expert[i] = static_cast<int>(e);
  }
  const int F = p.E * p.R;
  const int passes = drop.active ? p.K : 1;  // without a mask one pass folds all K slots
  constexpr int kGroup = V::kDrop ? 2 : 1;   // passes multiplied per staged weight chunk
  // The expert, rank and weight offset of fold columns [g0, g0 + FG), visible to all threads on return.
  const auto set_fold_columns = [&](int g0) {
    for (int n = tid; n < FG; n += kBlock) {
      const int f = g0 + n;
      fold_e[n] = f < F ? f / p.R : -1;
      fold_r[n] = f < F ? f % p.R : 0;
      fold_base[n] = f < F ? (f / p.R) * p.s_e + (f % p.R) * p.s_r : -1;
    }
    __syncthreads();
  };
  // fold [row][n] for those columns: the (weighted) rank vector of the row's slot k at the columns of its expert
  // (this pass's slot only, with a mask); a thread builds 8 consecutive columns of a row at a time.
  const auto fill_fold = [&](int pass, __nv_bfloat16* fold) {
    const int groups = FG / 8;
#pragma unroll 1
    for (int idx = tid; idx < kTile * groups; idx += kBlock) {
      const int row = idx / groups;
      const int c8 = idx % groups * 8;
      float v[8] = {};
#pragma unroll 1  // K is small (2 in MixLoRA); the model counts the loop's trips
      for (int k = 0; k < p.K; ++k) {
        const int ek = tok_expert[row * p.K + k];
        if (ek < 0 || (passes > 1 && k != pass)) {
          continue;
        }
        const int64_t j = static_cast<int64_t>(t0 + row) * p.K + k;
        const float w = p.row_weights ? p.row_weights[j] : 1.0f;
        const float* vj = p.v + j * p.v_stride;
        if (V::kVec || p.vec_v) {  // R % 8 == 0: the 8 columns are ranks r .. r + 7 of one expert
          if (fold_e[c8] == ek) {
            float u[8];
            load8<true>(vj + fold_r[c8], 8, true, u);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              v[i] = fmaf(w, u[i], v[i]);
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            v[i] = fold_e[c8 + i] == ek ? fmaf(w, vj[fold_r[c8 + i]], v[i]) : v[i];
          }
        }
      }
      store8_terms<float, dot_t>(v, fold + row * L.fold_ld + c8, L.fold_plane);
    }
  };
  if constexpr (WHOLE) {
    set_fold_columns(0);
    for (int pass = 0; pass < passes; ++pass) {
      fill_fold(pass, folds + pass * NV * L.fold_plane);
    }
  }
  const int c8 = tid % 8 * 8;
#pragma unroll 1
  for (int ht = 0; ht < h_tiles; ++ht) {
    const int h0 = (static_cast<int>(blockIdx.x) * h_tiles + ht) * kTile;
    if (h0 >= p.H) {
      break;
    }
    const auto active = [&](int i) { return tile_frag_row(i) * 16 < rows && h0 + tile_frag_col(i) * 16 < p.H; };
    float res[kOutRows][8] = {};
    // Passes in groups of kGroup: a staged weight chunk serves every pass of the group (one accumulator set each).
#pragma unroll 1
    for (int p0 = 0; p0 < passes; p0 += kGroup) {
      SplitAcc acc[kGroup][kTileFrags];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
#pragma unroll
        for (int i = 0; i < kTileFrags; ++i) {
          acc[g][i].zero();
        }
      }
      for (int g0 = 0; g0 < F; g0 += FG) {
        if constexpr (!WHOLE) {
          set_fold_columns(g0);
          for (int g = 0; g < kGroup && p0 + g < passes; ++g) {
            fill_fold(p0 + g, folds + g * NV * L.fold_plane);
          }
        }
        const int gn = F - g0 < FG ? F - g0 : FG;
        for (int f0 = 0; f0 < gn; f0 += kTile) {
          const int nrows = round16(gn - f0 < kTile ? gn - f0 : kTile);  // fold rows the MMAs read
          stage_weight_rows<dot_t, V>(ws, p.W, p.s_h, p.H, h0, nrows, p.vec_w,
                                           [&](int n) { return fold_base[f0 + n]; });
          __syncthreads();
#pragma unroll
          for (int g = 0; g < kGroup; ++g) {
            const __nv_bfloat16* fold = folds + (WHOLE ? p0 + g : g) * NV * L.fold_plane;
#pragma unroll
            for (int i = 0; i < kTileFrags; ++i) {
              if (p0 + g < passes && active(i)) {  // out (tokens x h) = fold (tokens x f) . stacked W (f x h)
                mma_terms<NV, NW, false, kChunkKMajor<V, false>>(
                    acc[g][i], {fold + tile_frag_row(i) * 16 * L.fold_ld + f0, 16, L.fold_plane, L.fold_ld},
                    {ws + chunk_at<V>(0, tile_frag_col(i) * 16), chunk_at<V>(16, 0), kPlane, kTileLd}, nrows / 16);
              }
            }
          }
          __syncthreads();
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (p0 + g < passes) {
          store_tile(stage, acc[g], active);
          __syncthreads();
#pragma unroll
          for (int q = 0; q < kOutRows; ++q) {
            const int row = tid / 8 + kBlock / 8 * q;
            const int64_t slot = static_cast<int64_t>(t0 + row) * p.K + p0 + g;
            const float4* st = reinterpret_cast<const float4*>(stage + row * kStageLd + c8);
            const float4 u0 = st[0], u1 = st[1];
            const float u[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
            for (int k = 0; k < 8; ++k) {  // rows >= rows, columns >= H: not written below
              res[q][k] += dropout_mult(drop, slot, p.H, h0 + c8 + k) * u[k];
            }
          }
          __syncthreads();  // the stage is the next weight chunk
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kOutRows; ++q) {
      const int row = tid / 8 + kBlock / 8 * q;
      if (row < rows) {
        store8<V::kVec>(p.out + static_cast<int64_t>(t0 + row) * p.H + h0 + c8, p.H - h0 - c8, p.scale, res[q]);
      }
    }
  }
}

template <typename x_t>
struct WeightGradArgs {
  const x_t* x;  // (T, H) token rows: x (shrink) or dy (expand)
  int64_t x_stride;
  const float* v;  // (S, R) slot rank vectors: dz (shrink) or zd (expand)
  int64_t v_stride;
  const float* row_weights;  // nullptr, or (S,) w_j multiplying v_j
  const int64_t* order;
  const int64_t* offsets;
  int S, K, H, R;
  Dropout drop;  // on x (shrink); inactive otherwise
  float scale;
  bool vec_x;  // rows_aligned(x)
  bool vec_v;  // R % 8 == 0 and rows_aligned(v)
  float* out;  // dW_e (r, h) at e * R * H + r * o_r + h * o_h: dA (E, R, H) or dB (E, H, R), fp32
  int o_r, o_h;

  bool aligned() const { return vec_x && vec_v && H % 8 == 0; }  // LoraVariant's VEC
};

template <typename x_t, typename dot_t, typename V>
__global__ void __launch_bounds__(kBlock, 1) weight_grad_mma_kernel(const WeightGradArgs<x_t> p) {
  constexpr int NX = kTerms<x_t, dot_t>;
  constexpr int NV = kTerms<float, dot_t>;
  const Dropout drop = static_dropout<V::kDrop>(p.drop);
  unsigned char* sm = dynamic_smem<unsigned char>();
  __nv_bfloat16* xs = smem_at<__nv_bfloat16>(sm, 0);
  __nv_bfloat16* vs = xs + NX * kPlane;
  float* stage = smem_at<float>(sm, 0);
  int64_t* row_off = smem_at<int64_t>(sm, lora_tile_planes_bytes(NX + NV));
  int* chunk_slot = smem_at<int>(sm, lora_tile_planes_bytes(NX + NV) + kTile * 8);
  const int tid = static_cast<int>(threadIdx.x);
  const int h0 = static_cast<int>(blockIdx.x) * kTile;
  const int e = static_cast<int>(blockIdx.y);
  const int rank0 = static_cast<int>(blockIdx.z) * kTile;
  const int ncols = p.R - rank0 < kTile ? p.R - rank0 : kTile;
  const int vgroups = round16(ncols) / 8;  // 8-rank groups of v staged per row: 2, 4, 6 or 8
  const int vshift = vgroups <= 2 ? 1 : vgroups <= 4 ? 2 : 3;  // a row's groups as a power of two: no division
  const int64_t start = p.offsets[e];
  const int64_t end = p.offsets[e + 1];
  const auto active = [&](int i) { return h0 + tile_frag_row(i) * 16 < p.H && tile_frag_col(i) * 16 < ncols; };
  SplitAcc acc[kTileFrags];
#pragma unroll
  for (int i = 0; i < kTileFrags; ++i) {
    acc[i].zero();
  }
  for (int64_t s0 = start; s0 < end; s0 += kTile) {
    const int n = end - s0 < kTile ? static_cast<int>(end - s0) : kTile;
    if (tid < kTile) {
      load_row_slot(p.order, s0, n, p.S, p.K, p.x_stride, chunk_slot, row_off);
    }
    __syncthreads();
    stage_token_rows<dot_t, V>(xs, chunk_slot, row_off, p.x, p.H, h0, drop, p.vec_x);
    // v [row][r] = (w_j) v_j at rank rank0 + r (zeros for no slot and from ncols on), for the round16(ncols) rank
    // columns the MMAs read; a thread stages 8 consecutive ranks of a row.
#pragma unroll 1
    for (int idx = tid; idx < kTile << vshift; idx += kBlock) {
      const int row = idx >> vshift;
      const int c8 = (idx & ((1 << vshift) - 1)) * 8;
      if (c8 >= vgroups * 8) {
        continue;
      }
      const int slot = chunk_slot[row];
      float u[8];
      load8<V::kVec>(p.v + static_cast<int64_t>(slot < 0 ? 0 : slot) * p.v_stride + rank0 + c8,
                     slot < 0 ? 0 : ncols - c8, V::kVec || p.vec_v, u);
      const float w = slot >= 0 && p.row_weights ? p.row_weights[slot] : 1.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        u[i] *= w;
      }
      store8_terms<float, dot_t>(u, vs + row * kTileLd + c8, kPlane);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTileFrags; ++i) {
      if (active(i)) {  // dW^T (h x ranks) = x^T (h x slots) . v (slots x ranks): x's [slot][h] plane K-major
        mma_terms<NX, NV, true, true>(
            acc[i], {xs + tile_frag_row(i) * 16, 16 * kTileLd, kPlane, kTileLd},
            {vs + tile_frag_col(i) * 16, 16 * kTileLd, kPlane, kTileLd}, (n + 15) / 16);
      }
    }
    __syncthreads();
  }
  store_tile(stage, acc, active);
  __syncthreads();
  float* out = p.out + static_cast<int64_t>(e) * p.R * p.H;
  for (int idx = tid; idx < kTile * kTile; idx += kBlock) {
    const int m = p.o_h == 1 ? idx % kTile : idx / kTile;  // consecutive threads write consecutive addresses
    const int r = p.o_h == 1 ? idx / kTile : idx % kTile;
    if (h0 + m < p.H && r < ncols) {
      out[(rank0 + r) * p.o_r + (h0 + m) * p.o_h] = p.scale * stage[m * kStageLd + r];
    }
  }
}

// ----- The arguments of the six launches (lora_shrink.cu, lora_expand_combine.cu and the CPU harness's mirrors),
// from the layouts of lora_shrink.h / lora_expand_combine.h. A is (E, R, H) with unit h stride, B (E, H, R) with unit
// r stride; x / dy rows and A rows move 8 elements per load where they are 16-byte aligned.

template <typename x_t, typename w_t>
SlotRankArgs<x_t, w_t> slot_rank_args(const x_t* x, int64_t x_stride, const w_t* W, int64_t s_e, int64_t s_r,
                                      int64_t s_h, const int64_t* order, const int64_t* offsets, int64_t E, int64_t S,
                                      int64_t K, int64_t H, int64_t R, Dropout drop, float scale, float* out) {
  return {x, x_stride, W, static_cast<int>(s_e), static_cast<int>(s_r), static_cast<int>(s_h), order, offsets,
          static_cast<int>(E), static_cast<int>(S), static_cast<int>(K), static_cast<int>(H), static_cast<int>(R),
          drop, scale, rows_aligned(x, {x_stride}), weight_rows_aligned(W, s_e, s_r, s_h, R), out};
}

template <typename dot_t, typename w_t, typename out_t>
TokenFoldArgs<w_t, out_t> token_fold_args(const float* v, int64_t v_stride, const float* row_weights,
                                          const int64_t* experts, const w_t* W, int64_t s_e, int64_t s_r, int64_t s_h,
                                          int64_t E, int64_t T, int64_t K, int64_t H, int64_t R, Dropout drop,
                                          float scale, out_t* out, int64_t sms) {
  return {v, v_stride, row_weights, experts, W, static_cast<int>(s_e), static_cast<int>(s_r), static_cast<int>(s_h),
          static_cast<int>(E), static_cast<int>(T), static_cast<int>(K), static_cast<int>(H), static_cast<int>(R),
          drop, scale, weight_rows_aligned(W, s_e, s_r, s_h, R), R % 8 == 0 && rows_aligned(v, {v_stride}), out,
          plan_token_fold<w_t, dot_t>(T, H, E, R, K, drop.active, sms)};
}

// out: dW (E, R, H) when o_r = H, o_h = 1; (E, H, R) when o_r = 1, o_h = R. fp32 contiguous.
template <typename x_t>
WeightGradArgs<x_t> weight_grad_args(const x_t* x, int64_t x_stride, const float* v, int64_t v_stride,
                                     const float* row_weights, const int64_t* order, const int64_t* offsets, int64_t S,
                                     int64_t K, int64_t H, int64_t R, Dropout drop, float scale, float* out,
                                     int64_t o_r, int64_t o_h) {
  return {x, x_stride, v, v_stride, row_weights, order, offsets, static_cast<int>(S), static_cast<int>(K),
          static_cast<int>(H), static_cast<int>(R), drop, scale, rows_aligned(x, {x_stride}),
          R % 8 == 0 && rows_aligned(v, {v_stride}), out, static_cast<int>(o_r), static_cast<int>(o_h)};
}

// The products' precision (dot_t of the kernels: kTerms, to_dot) of each op, as the Triton kernels' mma_dtype:
// lora_shrink's and its backward's, x's and A's common 16-bit dtype, else float; lora_expand_combine's and its
// backward's, B's dtype (grad_y and y are fp32 by contract).
template <typename x_t, typename w_t>
using shrink_dot_t = std::conditional_t<std::is_same_v<x_t, w_t>, x_t, float>;
template <typename w_t>
using expand_dot_t = w_t;

// The mask's 1 / (1 - p) scales the shrink's products (the operands are only masked).
inline float drop_scale(const Dropout& drop) {
  return drop.active ? drop.scale : 1.0f;
}

template <typename x_t, typename w_t>
SlotRankArgs<x_t, w_t> shrink_forward_args(const x_t* x, int64_t x_stride, const w_t* A, int64_t A_stride0,
                                           int64_t A_stride1, const int64_t* order, const int64_t* offsets,
                                           int64_t E, int64_t S, int64_t K, int64_t H, int64_t R, Dropout drop,
                                           float* z) {
  return slot_rank_args(x, x_stride, A, A_stride0, A_stride1, 1, order, offsets, E, S, K, H, R, drop,
                        drop_scale(drop), z);
}

template <typename w_t, typename x_t>
TokenFoldArgs<w_t, x_t> shrink_dx_args(const float* grad_z, int64_t gz_stride, const w_t* A, int64_t A_stride0,
                                       int64_t A_stride1, const int64_t* experts, int64_t E, int64_t T, int64_t K,
                                       int64_t H, int64_t R, Dropout drop, x_t* dx, int64_t sms) {
  return token_fold_args<shrink_dot_t<x_t, w_t>>(grad_z, gz_stride, nullptr, experts, A, A_stride0, A_stride1, 1, E,
                                                 T, K, H, R, drop, 1.0f, dx, sms);
}

template <typename x_t>
WeightGradArgs<x_t> shrink_dA_args(const float* grad_z, int64_t gz_stride, const x_t* x, int64_t x_stride,
                                   const int64_t* order, const int64_t* offsets, int64_t S, int64_t K, int64_t H,
                                   int64_t R, Dropout drop, float* dA) {
  return weight_grad_args(x, x_stride, grad_z, gz_stride, nullptr, order, offsets, S, K, H, R, drop,
                          drop_scale(drop), dA, H, 1);
}

template <typename w_t>
TokenFoldArgs<w_t, float> expand_forward_args(const float* zd, int64_t zd_stride, const float* weights,
                                              const int64_t* experts, const w_t* B, int64_t B_stride0,
                                              int64_t B_stride1, int64_t E, int64_t T, int64_t K, int64_t H,
                                              int64_t R, float scale, float* y, int64_t sms) {
  return token_fold_args<expand_dot_t<w_t>>(zd, zd_stride, weights, experts, B, B_stride0, 1, B_stride1, E, T, K, H,
                                            R, make_dropout(0.0, 0), scale, y, sms);
}

// Launched with one rank tile (slot_rank_grid(S, E, 1)): dw_j sums every rank.
template <typename gy_t, typename w_t>
SlotRankArgs<gy_t, w_t> expand_q_args(const gy_t* grad_y, int64_t gy_stride, const float* zd, int64_t zd_stride,
                                      const w_t* B, int64_t B_stride0, int64_t B_stride1, const float* weights,
                                      const int64_t* order, const int64_t* offsets, int64_t E, int64_t S, int64_t K,
                                      int64_t H, int64_t R, float scale, float* dzd, float* dweights) {
  SlotRankArgs<gy_t, w_t> p = slot_rank_args(grad_y, gy_stride, B, B_stride0, 1, B_stride1, order, offsets, E, S, K,
                                             H, R, make_dropout(0.0, 0), scale, dzd);
  p.row_weights = weights;
  p.zd = zd;
  p.zd_stride = zd_stride;
  p.dweights = dweights;
  return p;
}

template <typename gy_t>
WeightGradArgs<gy_t> expand_dB_args(const gy_t* grad_y, int64_t gy_stride, const float* zd, int64_t zd_stride,
                                    const float* weights, const int64_t* order, const int64_t* offsets, int64_t S,
                                    int64_t K, int64_t H, int64_t R, float scale, float* dB) {
  return weight_grad_args(grad_y, gy_stride, zd, zd_stride, weights, order, offsets, S, K, H, R,
                          make_dropout(0.0, 0), scale, dB, 1, R);
}

}  // namespace
}  // namespace mixlora
