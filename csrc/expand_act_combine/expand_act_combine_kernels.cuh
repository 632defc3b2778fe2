// The device code of expand_act_combine: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in expand_act_combine.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include "common.cuh"
#include "tensor_core.cuh"

namespace mixlora {
namespace {

constexpr int kPass = 32;        // reduction outputs per pass in the token kernels
constexpr int kChunkSlots = 16;  // weight-gradient kernel: slots per shared tile
constexpr size_t kMaxSmem = 48 * 1024;  // per-block limit without a cudaFuncSetAttribute opt-in
constexpr size_t kTokenStaticSmem = (kWarps + 1) * kPass * sizeof(float);
constexpr size_t kWeightStaticSmem = 3 * kChunkSlots * kLd * sizeof(float) + kChunkSlots * sizeof(int64_t);

// weight_t: the dtype of Bg, Bu, Ad: G's (read as they are) or float (api.cpp casts weights of another dtype).
template <typename scalar_t, typename weight_t>
struct Args {
  const scalar_t* G;
  int64_t G_stride;
  const scalar_t* U;  // nullptr: ungated, h = act(g)
  int64_t U_stride;
  const float* zg;
  int64_t zg_stride;
  const float* zu;
  int64_t zu_stride;
  const weight_t* Bg;
  int64_t Bg_stride0, Bg_stride1;
  const weight_t* Bu;
  int64_t Bu_stride0, Bu_stride1;
  const weight_t* Ad;
  int64_t Ad_stride0, Ad_stride1;
  const float* weights;
  const int64_t* experts;
  const int64_t* order;
  const int64_t* offsets;
  int64_t T, K, I, E, Rg, Ru, Rd;
  float scale;
  int act;
  Dropout drop;
};

// g, u, act(g) of slot (expert e) at column i from the base values and the slot's rank vectors.
// Ungated: u = 1, so h = act(g) * u and dg = dh act'(g) u are exact.
template <typename scalar_t, typename weight_t>
__device__ __forceinline__ void recompute(const Args<scalar_t, weight_t>& p, float Gi, float Ui, const float* zg_row,
                                          const float* zu_row, int64_t e, int64_t i, float& g, float& u,
                                          float& a) {
  const weight_t* bg = p.Bg + e * p.Bg_stride0 + i * p.Bg_stride1;
  float sg = 0.0f;
  for (int64_t r = 0; r < p.Rg; ++r) {
    sg = fmaf(static_cast<float>(bg[r]), zg_row[r], sg);
  }
  g = Gi + p.scale * sg;
  u = 1.0f;
  if (p.U != nullptr) {
    const weight_t* bu = p.Bu + e * p.Bu_stride0 + i * p.Bu_stride1;
    float su = 0.0f;
    for (int64_t r = 0; r < p.Ru; ++r) {
      su = fmaf(static_cast<float>(bu[r]), zu_row[r], su);
    }
    u = Ui + p.scale * su;
  }
  a = act_forward(p.act, g);
}

// Backward elementwise chain at column i of slot j (expert e, weight w): h, dg, du, and the dropout multiplier.
template <typename scalar_t, typename weight_t>
__device__ __forceinline__ void slot_backward(const Args<scalar_t, weight_t>& p, float Gi, float Ui, float gh,
                                              const float* zg_row, const float* zu_row, const float* dzd_row,
                                              int64_t j, int64_t e, float w, int64_t i, float& h, float& dg,
                                              float& du, float& mask) {
  float g, u, a;
  recompute(p, Gi, Ui, zg_row, zu_row, e, i, g, u, a);
  h = a * u;
  mask = dropout_mult(p.drop, j, p.I, i);
  float bd = 0.0f;
  const weight_t* ad = p.Ad + e * p.Ad_stride0 + i;
  for (int64_t r = 0; r < p.Rd; ++r) {
    bd = fmaf(static_cast<float>(ad[r * p.Ad_stride1]), dzd_row[r], bd);
  }
  const float dh = w * gh + bd * mask;
  dg = dh * act_grad(p.act, g) * u;
  du = dh * a;
}

__device__ __forceinline__ int64_t checked_expert(const int64_t* experts, int64_t j, int64_t num_experts) {
  const int64_t e = experts[j];
  CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "expand_act_combine: expert id out of range [0, E)");
  return e;
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
eac_fwd_kernel(Args<scalar_t, weight_t> p, scalar_t* __restrict__ hbar, float* __restrict__ zd) {
  float* z_rows = dynamic_smem<float>();  // K x (Rg + Ru): [zg_j | zu_j] of the token's slots
  __shared__ float red[kWarps * kPass];
  __shared__ float sums[kPass];
  const int64_t t = blockIdx.x;
  const int64_t Rz = p.Rg + p.Ru;
  for (int64_t idx = threadIdx.x; idx < p.K * Rz; idx += blockDim.x) {
    const int64_t j = t * p.K + idx / Rz;
    const int64_t r = idx % Rz;
    z_rows[idx] = r < p.Rg ? p.zg[j * p.zg_stride + r] : p.zu[j * p.zu_stride + r - p.Rg];
  }
  __syncthreads();

  for (int64_t i = threadIdx.x; i < p.I; i += blockDim.x) {
    const float Gi = static_cast<float>(p.G[t * p.G_stride + i]);
    const float Ui = p.U != nullptr ? static_cast<float>(p.U[t * p.U_stride + i]) : 0.0f;
    float hb = 0.0f;
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t j = t * p.K + k;
      const int64_t e = checked_expert(p.experts, j, p.E);
      float g, u, a;
      recompute(p, Gi, Ui, z_rows + k * Rz, z_rows + k * Rz + p.Rg, e, i, g, u, a);
      hb += (a * u) * p.weights[j];
    }
    hbar[t * p.I + i] = static_cast<scalar_t>(hb);
  }

  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t j = t * p.K + k;
    const int64_t e = checked_expert(p.experts, j, p.E);
    const weight_t* ad = p.Ad + e * p.Ad_stride0;
    for (int64_t r0 = 0; r0 < p.Rd; r0 += kPass) {
      float part[kPass] = {};
      for (int64_t i = threadIdx.x; i < p.I; i += blockDim.x) {
        const float Gi = static_cast<float>(p.G[t * p.G_stride + i]);
        const float Ui = p.U != nullptr ? static_cast<float>(p.U[t * p.U_stride + i]) : 0.0f;
        float g, u, a;
        recompute(p, Gi, Ui, z_rows + k * Rz, z_rows + k * Rz + p.Rg, e, i, g, u, a);
        const float hm = (a * u) * dropout_mult(p.drop, j, p.I, i);
#pragma unroll
        for (int c = 0; c < kPass; ++c) {
          if (r0 + c < p.Rd) {
            part[c] = fmaf(static_cast<float>(ad[(r0 + c) * p.Ad_stride1 + i]), hm, part[c]);
          }
        }
      }
      block_sum(part, red, sums);
      if (threadIdx.x < kPass && r0 + threadIdx.x < p.Rd) {
        zd[j * p.Rd + r0 + threadIdx.x] = sums[threadIdx.x];
      }
    }
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
eac_bwd_token_kernel(Args<scalar_t, weight_t> p, const scalar_t* __restrict__ grad_hbar, int64_t gh_stride,
                     const float* __restrict__ grad_zd, int64_t gzd_stride, scalar_t* __restrict__ dG,
                     scalar_t* __restrict__ dU, float* __restrict__ dzg, float* __restrict__ dzu,
                     float* __restrict__ dweights) {
  float* rows = dynamic_smem<float>();  // K x (Rg + Ru + Rd): [zg_j | zu_j | dzd_j] of the token's slots
  __shared__ float red[kWarps * kPass];
  __shared__ float sums[kPass];
  const int64_t t = blockIdx.x;
  const int64_t Rz = p.Rg + p.Ru;
  const int64_t Rall = Rz + p.Rd;
  for (int64_t idx = threadIdx.x; idx < p.K * Rall; idx += blockDim.x) {
    const int64_t j = t * p.K + idx / Rall;
    const int64_t r = idx % Rall;
    rows[idx] = r < p.Rg ? p.zg[j * p.zg_stride + r]
              : r < Rz   ? p.zu[j * p.zu_stride + r - p.Rg]
                         : grad_zd[j * gzd_stride + r - Rz];
  }
  __syncthreads();

  for (int64_t i = threadIdx.x; i < p.I; i += blockDim.x) {
    const float Gi = static_cast<float>(p.G[t * p.G_stride + i]);
    const float Ui = p.U != nullptr ? static_cast<float>(p.U[t * p.U_stride + i]) : 0.0f;
    const float gh = static_cast<float>(grad_hbar[t * gh_stride + i]);
    float dG_acc = 0.0f;
    float dU_acc = 0.0f;
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t j = t * p.K + k;
      const int64_t e = checked_expert(p.experts, j, p.E);
      const float* row = rows + k * Rall;
      float h, dg, du, mask;
      slot_backward(p, Gi, Ui, gh, row, row + p.Rg, row + Rz, j, e, p.weights[j], i, h, dg, du, mask);
      dG_acc += dg;
      dU_acc += du;
    }
    dG[t * p.I + i] = static_cast<scalar_t>(dG_acc);
    if (dU != nullptr) {
      dU[t * p.I + i] = static_cast<scalar_t>(dU_acc);
    }
  }

  // Columns of pass B: [dzg (Rg) | dzu (Ru) | dw (1)].
  const int64_t ncols = Rz + 1;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t j = t * p.K + k;
    const int64_t e = checked_expert(p.experts, j, p.E);
    const float* row = rows + k * Rall;
    const float w = p.weights[j];
    const weight_t* bg = p.Bg + e * p.Bg_stride0;
    const weight_t* bu = p.Bu + e * p.Bu_stride0;
    for (int64_t c0 = 0; c0 < ncols; c0 += kPass) {
      float part[kPass] = {};
      for (int64_t i = threadIdx.x; i < p.I; i += blockDim.x) {
        const float Gi = static_cast<float>(p.G[t * p.G_stride + i]);
        const float Ui = p.U != nullptr ? static_cast<float>(p.U[t * p.U_stride + i]) : 0.0f;
        const float gh = static_cast<float>(grad_hbar[t * gh_stride + i]);
        float h, dg, du, mask;
        slot_backward(p, Gi, Ui, gh, row, row + p.Rg, row + Rz, j, e, w, i, h, dg, du, mask);
#pragma unroll
        for (int c = 0; c < kPass; ++c) {
          const int64_t col = c0 + c;
          if (col < p.Rg) {
            part[c] = fmaf(dg, static_cast<float>(bg[i * p.Bg_stride1 + col]), part[c]);
          } else if (col < Rz) {
            part[c] = fmaf(du, static_cast<float>(bu[i * p.Bu_stride1 + col - p.Rg]), part[c]);
          } else if (col == Rz) {
            part[c] = fmaf(gh, h, part[c]);
          }
        }
      }
      block_sum(part, red, sums);
      const int64_t col = c0 + threadIdx.x;
      if (threadIdx.x < kPass && col < ncols) {
        const float v = sums[threadIdx.x];
        if (col < p.Rg) {
          dzg[j * p.Rg + col] = p.scale * v;
        } else if (col < Rz) {
          dzu[j * p.Ru + col - p.Rg] = p.scale * v;
        } else {
          dweights[j] = v;
        }
      }
    }
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
eac_bwd_weight_kernel(Args<scalar_t, weight_t> p, const scalar_t* __restrict__ grad_hbar, int64_t gh_stride,
                      const float* __restrict__ grad_zd, int64_t gzd_stride, float* __restrict__ dBg,
                      float* __restrict__ dBu, float* __restrict__ dAd) {
  float* Z = dynamic_smem<float>();  // kChunkSlots x (Rg + Ru + Rd): [zg_j | zu_j | dzd_j]
  __shared__ float Pg[kChunkSlots * kLd];  // dg, [slot][i]
  __shared__ float Pu[kChunkSlots * kLd];  // du
  __shared__ float Ph[kChunkSlots * kLd];  // drop(h)
  __shared__ int64_t chunk_slot[kChunkSlots];
  const int tid = threadIdx.x;
  const int m = tid % kTileM;
  const int cg = tid / kTileM;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTileM + m;
  const int64_t expert = blockIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kTileN;
  const int64_t Rz = p.Rg + p.Ru;
  const int64_t Rall = Rz + p.Rd;
  const int ncols = static_cast<int>(Rall - c0 < kTileN ? Rall - c0 : kTileN);
  const int64_t start = p.offsets[expert];
  const int64_t end = p.offsets[expert + 1];
  const int64_t num_slots = p.T * p.K;
  float acc[kPerThread] = {};
  for (int64_t s0 = start; s0 < end; s0 += kChunkSlots) {
    if (tid < kChunkSlots) {
      int64_t slot = -1;
      if (s0 + tid < end) {
        slot = p.order[s0 + tid];
        CUDA_KERNEL_ASSERT(slot >= 0 && slot < num_slots &&
                           "expand_act_combine_backward: order holds a slot id out of range");
      }
      chunk_slot[tid] = slot;
    }
    __syncthreads();
    for (int64_t idx = tid; idx < kChunkSlots * Rall; idx += blockDim.x) {
      const int64_t slot = chunk_slot[idx / Rall];
      const int64_t r = idx % Rall;
      float v = 0.0f;
      if (slot >= 0) {
        v = r < p.Rg ? p.zg[slot * p.zg_stride + r]
          : r < Rz   ? p.zu[slot * p.zu_stride + r - p.Rg]
                     : grad_zd[slot * gzd_stride + r - Rz];
      }
      Z[idx] = v;
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kChunkSlots / kColGroups; ++it) {
      const int s = cg + it * kColGroups;
      const int64_t slot = chunk_slot[s];
      float dg = 0.0f;
      float du = 0.0f;
      float hin = 0.0f;
      if (slot >= 0 && i < p.I) {
        const int64_t t = slot / p.K;
        const float Gi = static_cast<float>(p.G[t * p.G_stride + i]);
        const float Ui = p.U != nullptr ? static_cast<float>(p.U[t * p.U_stride + i]) : 0.0f;
        const float gh = static_cast<float>(grad_hbar[t * gh_stride + i]);
        const float* row = Z + s * Rall;
        float h, mask;
        slot_backward(p, Gi, Ui, gh, row, row + p.Rg, row + Rz, slot, expert, p.weights[slot], i, h, dg, du,
                      mask);
        hin = h * mask;
      }
      Pg[s * kLd + m] = dg;
      Pu[s * kLd + m] = du;
      Ph[s * kLd + m] = hin;
    }
    __syncthreads();
    for (int k = 0; k < kChunkSlots; ++k) {
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        const int c = cg + kColGroups * q;
        if (c < ncols) {
          const int64_t col = c0 + c;
          const float* P = col < p.Rg ? Pg : col < Rz ? Pu : Ph;
          acc[q] = fmaf(P[k * kLd + m], Z[k * Rall + col], acc[q]);
        }
      }
    }
    __syncthreads();
  }
  if (i < p.I) {
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int c = cg + kColGroups * q;
      if (c < ncols) {
        const int64_t col = c0 + c;
        if (col < p.Rg) {
          dBg[(expert * p.I + i) * p.Rg + col] = p.scale * acc[q];
        } else if (col < Rz) {
          dBu[(expert * p.I + i) * p.Ru + col - p.Rg] = p.scale * acc[q];
        } else {
          dAd[(expert * p.Rd + col - Rz) * p.I + i] = acc[q];
        }
      }
    }
  }
}


// ---------------------------------------------------------------------------------------------------------------
// Tensor-core path (bf16 G/U and bf16 weights; expand_act_combine.cu describes the design).
constexpr int kMmaCols = 64;     // I columns per step: 128-byte rows of G, U, dH̄ and hbar
constexpr int kMmaMaxRank = 64;  // ranks padded to 16, at most 4 fragments each
constexpr size_t kMmaMaxSmem = 227 * 1024;  // sm_90's dynamic shared memory per block (cudaFuncSetAttribute)

using MmaArgs = Args<c10::BFloat16, c10::BFloat16>;

// Splits of the I steps over gridDim.x: with fewer token tiles than two waves of an H200 (2 x 132 SMs, one
// ~200 KiB block each), the columns are split too, at most one split per 64-column step and 16 in all (the
// partial sums cost splits x S x (R + 1) fp32, summed by eac_split_sum_kernel).
__host__ __device__ inline int mma_splits(int tiles, int64_t I) {
  const int steps = static_cast<int>((I + kMmaCols - 1) / kMmaCols);
  int splits = (2 * 132 + tiles - 1) / tiles;
  splits = splits < 16 ? splits : 16;
  splits = splits < steps ? splits : steps;
  return splits > 1 ? splits : 1;
}

// Calls f(std::integral_constant<int, NF>{}) for the instantiation serving ranks padded to 16 * nf fragments.
template <typename F>
void dispatch_rank_frags(int64_t Rg, int64_t Ru, int64_t Rd, F&& f) {
  const int64_t r = Rg > Ru ? (Rg > Rd ? Rg : Rd) : (Ru > Rd ? Ru : Rd);
  if (r <= 16) {
    f(std::integral_constant<int, 1>{});
  } else if (r <= 32) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

// Calls f(std::integral_constant<int, act>{}): kernels with the activation as a compile-time constant, so that
// act_forward / act_forward_grad fold to the one activation's code.
template <typename F>
void dispatch_activation(int act, F&& f) {
  switch (act) {
    case kSilu:
      return f(std::integral_constant<int, kSilu>{});
    case kGelu:
      return f(std::integral_constant<int, kGelu>{});
    case kGeluTanh:
      return f(std::integral_constant<int, kGeluTanh>{});
    default:
      return f(std::integral_constant<int, kRelu>{});
  }
}

// Calls f(nf, act, vec, drop) with the compile-time constants of a tensor-core kernel instantiation
// (dispatch_rank_frags, dispatch_activation, whether mma_rows_aligned holds and whether dropout is on).
template <typename F>
void dispatch_tiles(int64_t Rg, int64_t Ru, int64_t Rd, int act, bool vec, bool drop, F&& f) {
  const auto with = [&](auto nf, auto act_c, auto vec_c) {
    drop ? f(nf, act_c, vec_c, std::true_type{}) : f(nf, act_c, vec_c, std::false_type{});
  };
  dispatch_rank_frags(Rg, Ru, Rd, [&](auto nf) {
    dispatch_activation(act, [&](auto act_c) {
      vec ? with(nf, act_c, std::true_type{}) : with(nf, act_c, std::false_type{});
    });
  });
}

inline unsigned int split_sum_blocks(int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks < 1024 ? blocks : 1024);
}


// dst[0..8) = src[0..n) and zeros after (n <= 8). VEC: 16-byte aligned rows in whole chunks of 8 (n is 0 or 8,
// mma_rows_aligned), one 16-byte copy or zero store; else one value at a time.
template <bool VEC>
__device__ __forceinline__ void copy8(unsigned short* dst, const c10::BFloat16* src, int n) {
  if (VEC) {
    *reinterpret_cast<uint4*>(dst) = n == 8 ? *reinterpret_cast<const uint4*>(src) : uint4{0u, 0u, 0u, 0u};
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    dst[k] = k < n ? src[k].x : static_cast<unsigned short>(0);
  }
}

// dst[0..4) = src[0..4) as bf16 (zeros unless `load`) when `store`: one 16-byte load and one 8-byte store (src
// 16-byte aligned, dst 8-byte aligned).
__device__ __forceinline__ void stage4_bf16(__nv_bfloat16* dst, const float* src, bool load, bool store) {
  if (store) {
    const float4 v = load ? *reinterpret_cast<const float4*>(src) : float4{0.0f, 0.0f, 0.0f, 0.0f};
    *reinterpret_cast<uint2*>(dst) = uint2{pack_bf16(v.x, v.y), pack_bf16(v.z, v.w)};
  }
}

__device__ __forceinline__ int clamp8(int n) {
  return n < 0 ? 0 : n < 8 ? n : 8;
}

// Host side: whether every bf16 row the tensor-core kernels stage (weights' rank rows, Ad's and the activations'
// column rows) starts on 16 bytes and is whole chunks of 8 values (I and the gate / up ranks multiples of 8), so that
// they move 8 values per load: the kernels' VEC instantiation.
inline bool mma_rows_aligned(const MmaArgs& p, const void* grad_hbar, int64_t gh_stride) {
  auto ok = [](const void* ptr, std::initializer_list<int64_t> strides) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return false;
    }
    for (int64_t s : strides) {
      if (s % 8 != 0) {
        return false;
      }
    }
    return true;
  };
  return p.I % 8 == 0 && ok(p.G, {p.G_stride}) && ok(p.U, {p.U_stride}) && ok(grad_hbar, {gh_stride}) &&
         ok(p.Bg, {p.Bg_stride0, p.Bg_stride1, p.Rg}) && ok(p.Bu, {p.Bu_stride0, p.Bu_stride1, p.Ru}) &&
         ok(p.Ad, {p.Ad_stride0, p.Ad_stride1});
}

// Host side: whether the fp32 rank rows zg, zu and grad_zd (stride gzd_stride) are runs of 4 values starting on 16
// bytes (every rank a multiple of 4): with mma_rows_aligned, eac_bwd_weight_mma_kernel's VEC instantiation.
inline bool rank_rows_aligned(const MmaArgs& p, const float* grad_zd, int64_t gzd_stride) {
  return p.Rg % 4 == 0 && p.Ru % 4 == 0 && p.Rd % 4 == 0 && rows_aligned(p.zg, {p.zg_stride}) &&
         rows_aligned(p.zu, {p.zu_stride}) && rows_aligned(grad_zd, {gzd_stride});
}

// The slab of columns [i0, i0 + 64) of expert e's Bg or Bu, stored [c][r] with row stride ld (its first Rp ranks
// zero-padded, ld a multiple of 8), 8 ranks per copy; experts e0 .. e0 + ne - 1 land at dst + (e - e0) * 64 * ld.
// A thread's ranks r and columns c are fixed (one or two columns; its offsets are computed once per step): its
// copies step over the experts. The loaders' loops are kept rolled (`#pragma unroll 1`): one SASS loop each, whose
// instructions benchmarks/sm90_cost.py counts exactly.
template <int NF, bool VEC>
__device__ __forceinline__ void load_b_slab(unsigned short* dst, const c10::BFloat16* B, int64_t s0, int64_t s1,
                                            int R, int Rp, int ld, int e0, int ne, int i0, int I) {
  constexpr int kRankCopies = 2 * NF;                                // 8-rank copies per column
  constexpr int kColsPerPass = kBlock / kRankCopies;                 // 128, 64, 32 (expert, column) pairs
  constexpr int kColStep = kColsPerPass < kMmaCols ? kColsPerPass : kMmaCols;
  constexpr int kBExpStep = kColsPerPass / kColStep;                 // experts per pass: 2, 1, 1
  const int r = static_cast<int>(threadIdx.x) % kRankCopies * 8;
  const int c = static_cast<int>(threadIdx.x) / kRankCopies % kColStep;
  if (r >= Rp) {
    return;
  }
  // Weight offsets fit 32 bits (api.cpp checks the weights' spans).
  const int es = static_cast<int>(s0);
  int n[kMmaCols / kColStep], off[kMmaCols / kColStep];
#pragma unroll
  for (int j = 0; j < kMmaCols / kColStep; ++j) {
    n[j] = i0 + c + j * kColStep < I ? clamp8(R - r) : 0;
    off[j] = n[j] > 0 ? static_cast<int>(e0 * s0 + (i0 + c + j * kColStep) * s1) + r : 0;
  }
#pragma unroll 1
  for (int e = static_cast<int>(threadIdx.x) / kRankCopies / kColStep; e < ne; e += kBExpStep) {
#pragma unroll
    for (int j = 0; j < kMmaCols / kColStep; ++j) {
      copy8<VEC>(dst + (e * kMmaCols + c + j * kColStep) * ld + r, B + (n[j] > 0 ? off[j] + e * es : 0), n[j]);
    }
  }
}

// The slab of columns [i0, i0 + 64) of experts e0 .. e0 + ne - 1 of Ad, stored [e][r][c] (Rp ranks, zero-padded) with row
// stride ld (a multiple of 8). A thread's columns c (8 per copy) and rank rows r are fixed (one or two ranks): its
// copies step over the experts.
template <int NF, bool VEC>
__device__ __forceinline__ void load_ad_slab(unsigned short* dst, const c10::BFloat16* Ad, int64_t s0, int64_t s1,
                                             int R, int Rp, int ld, int e0, int ne, int i0, int I) {
  constexpr int kRankRows = 16 * NF;                                 // rank rows per expert: 16, 32, 64
  constexpr int kRowsPerPass = kBlock / (kMmaCols / 8);              // 32 (expert, rank) rows
  constexpr int kRankStep = kRowsPerPass < kRankRows ? kRowsPerPass : kRankRows;
  constexpr int kAdExpStep = kRowsPerPass / kRankStep;               // experts per pass: 2, 1, 1
  const int c = static_cast<int>(threadIdx.x) % (kMmaCols / 8) * 8;
  const int r = static_cast<int>(threadIdx.x) / (kMmaCols / 8) % kRankStep;
  const int nc = clamp8(I - i0 - c);
  const int es = static_cast<int>(s0);
  int n[kRankRows / kRankStep], off[kRankRows / kRankStep];
#pragma unroll
  for (int j = 0; j < kRankRows / kRankStep; ++j) {
    n[j] = r + j * kRankStep < R ? nc : 0;
    off[j] = n[j] > 0 ? static_cast<int>(e0 * s0 + (r + j * kRankStep) * s1) + i0 + c : 0;
  }
#pragma unroll 1
  for (int e = static_cast<int>(threadIdx.x) / (kMmaCols / 8) / kRankStep; e < ne; e += kAdExpStep) {
#pragma unroll
    for (int j = 0; j < kRankRows / kRankStep; ++j) {
      if (r + j * kRankStep < Rp) {
        copy8<VEC>(dst + (e * Rp + r + j * kRankStep) * ld + c, Ad + (n[j] > 0 ? off[j] + e * es : 0), n[j]);
      }
    }
  }
}

// Columns [i0, i0 + 64) of the rows 0 .. rows - 1 of a (T, I) bf16 tensor (src: its first row of the tile, row
// stride `stride`) into dst with row stride ld, zeros beyond I and for the tile's rows rows .. BT - 1.
template <bool VEC>
__device__ __forceinline__ void load_rows(unsigned short* dst, const c10::BFloat16* src, int64_t stride, int rows,
                                          int BT, int ld, int i0, int I) {
  const int c = static_cast<int>(threadIdx.x) % (kMmaCols / 8) * 8;
  const int cnt = clamp8(I - i0 - c);
#pragma unroll 1
  for (int tl = static_cast<int>(threadIdx.x) / (kMmaCols / 8); tl < BT; tl += kBlock / (kMmaCols / 8)) {
    const int n = tl < rows ? cnt : 0;
    copy8<VEC>(dst + tl * ld + c, src + (n > 0 ? tl * stride + i0 + c : 0), n);
  }
}

// Token kernels on register tiles (mma_16816: accumulators stay in registers, in the layout tensor_core.cuh states).
// A block owns BT = 128 / KP whole tokens as 128 slot rows, row = token * KP + k with KP = K rounded up to a power of
// two (rows k >= K are padding: zero rank vectors, zero weight). The rows are sorted by expert (`sort_rows_by_expert`)
// and dealt 16 per warp, so that a warp's rows span one or two experts; every product runs over the experts present
// in the warp (`experts_of_warp`), each with the A rows of other experts zeroed, against that expert's slab. The
// block walks its I split in steps of 64 columns, staging per step the 64-column slabs of every expert's Bg, Bu
// ([e][c][r]) and Ad ([e][r][c]) and the tile's rows of G, U (and dH̄), and each step in chunks of 16 columns: the
// per-token sums (hbar; dG, dU) go through fp32 slot rows in shared memory, summed in k order after a barrier
// (`store_chunk_sums`). fp32 operands (the rank vectors, h, dg, du) are rounded to bf16 for the tensor cores, as a
// bf16 LoRA rounds its own.
constexpr int kTileRows = 16 * kWarps;
constexpr int kSlabPad = 8;  // bf16 per shared row beyond its data: row strides of 16 bytes mod 128, no bank conflicts
constexpr int kLdc = kMmaCols + kSlabPad;  // row stride (bf16) of the Ad slab and the staged G, U, dH̄ rows

// Byte offsets of the token kernels' shared arrays (128-byte aligned) and the row strides of their slabs.
struct TileLayout {
  int KP, BT, E, Rgp, Rup, Rdp;
  int ldg, ldu, ldz;  // row strides (bf16) of the Bg / Bu slabs and of the staged rank rows [zg | zu (| dzd)]
  int sBg, sBu, sAd, sG, sU, sGH, sZ, sEx, sPerm;  // sGH: the backward's only
  int sComb;  // the per-chunk slot rows of w h (forward) or dg, du (fp32, 16 columns), over sZ once it is consumed
  size_t bytes;
};

__host__ __device__ inline int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) {
    p *= 2;
  }
  return p;
}

// backward: the rank rows also hold dzd, and the tile's dH̄ rows are staged too.
__host__ __device__ inline TileLayout make_tile_layout(int64_t K, int64_t E, int64_t Rg, int64_t Ru, int64_t Rd,
                                                       bool backward) {
  TileLayout L{};
  L.KP = pow2_at_least(K < 1024 ? K : 1024);
  L.BT = L.KP <= 8 ? kTileRows / L.KP : 0;
  L.E = static_cast<int>(E < 65536 ? E : 65536);
  L.Rgp = round16(static_cast<int>(Rg < 4096 ? Rg : 4096));
  L.Rup = round16(static_cast<int>(Ru < 4096 ? Ru : 4096));
  L.Rdp = round16(static_cast<int>(Rd < 4096 ? Rd : 4096));
  L.ldg = L.Rgp + kSlabPad;
  L.ldu = L.Rup + kSlabPad;
  L.ldz = L.Rgp + L.Rup + (backward ? L.Rdp : 0) + kSlabPad;
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const int off = static_cast<int>(at);
    at += (bytes + 127) / 128 * 128;
    return off;
  };
  const size_t rows = static_cast<size_t>(L.BT) * kLdc * 2;
  L.sBg = take(static_cast<size_t>(L.E) * kMmaCols * L.ldg * 2);
  L.sBu = take(static_cast<size_t>(L.E) * kMmaCols * L.ldu * 2);
  L.sAd = take(static_cast<size_t>(L.E) * L.Rdp * kLdc * 2);
  L.sG = take(rows);
  L.sU = take(rows);
  L.sGH = backward ? take(rows) : 0;
  const size_t z_bytes = static_cast<size_t>(kTileRows) * L.ldz * 2;
  const size_t comb_bytes = static_cast<size_t>(backward ? 2 : 1) * kTileRows * 16 * sizeof(float);
  L.sZ = take(z_bytes > comb_bytes ? z_bytes : comb_bytes);
  L.sComb = L.sZ;
  L.sEx = take(static_cast<size_t>(kWarps) * 16 * sizeof(int));
  L.sPerm = take(static_cast<size_t>(3) * kTileRows * sizeof(int));
  L.bytes = at;
  return L;
}

// perm[pos] = the block's row (token order: row = token * KP + k) at position pos, the rows sorted by expert
// (stably; padding rows last), so that a warp's 16 positions span few experts. Each row's key is expert * 128 + row
// (distinct); two threads per row count the smaller keys, each in one half of the rows (fixed order, no atomics).
__device__ inline const int* sort_rows_by_expert(const MmaArgs& p, const TileLayout& L, unsigned char* sm,
                                                 int64_t t0) {
  static_assert(kBlock == 2 * kTileRows, "sort_rows_by_expert: two threads per row");
  int* key = smem_at<int>(sm, L.sPerm);
  int* perm = key + kTileRows;
  int* half = perm + kTileRows;
  const int K = static_cast<int>(p.K);
  const int r = threadIdx.x % kTileRows;
  if (threadIdx.x < kTileRows) {
    const int64_t t = t0 + r / L.KP;
    const int k = r % L.KP;
    const int e = t < p.T && k < K ? static_cast<int>(p.experts[t * K + k]) : L.E;  // ids checked by lane_rows
    key[r] = e * kTileRows + r;
  }
  __syncthreads();
  const int kr = key[r];
  const int4* keys = reinterpret_cast<const int4*>(key + threadIdx.x / kTileRows * (kTileRows / 2));
  int pos = 0;
#pragma unroll 4
  for (int q = 0; q < kTileRows / 8; ++q) {
    const int4 v = keys[q];
    pos += (v.x < kr) + (v.y < kr) + (v.z < kr) + (v.w < kr);
  }
  if (threadIdx.x >= kTileRows) {
    half[r] = pos;
  }
  __syncthreads();
  if (threadIdx.x < kTileRows) {
    perm[pos + half[r]] = r;
  }
  __syncthreads();
  return perm;
}

// This lane's two positions of its block, warp * 16 + g and + 8, holding rows perm[pos]:
// the rows, slot ids (-1 for a padding row or a token beyond T; they fit 32 bits: api.cpp checks T * K < 2^31),
// experts (-1 for none), routing weights (0 for none), and the word (two bf16) of the row's token at the lane's
// column pair 2 tq of the staged G, U, dH̄ rows (row stride kLdc).
struct LaneRows {
  int row[2];
  int slot[2];
  int ex[2];
  float w[2];
  int word[2];
};

__device__ inline LaneRows lane_rows(const MmaArgs& p, const TileLayout& L, int64_t t0, const int* perm) {
  LaneRows lr;
  const int K = static_cast<int>(p.K);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int pos = static_cast<int>(threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4) + 8 * h;
    const int row = perm[pos];
    const int64_t t = t0 + row / L.KP;
    const int k = row % L.KP;
    const bool ok = t < p.T && k < K;
    lr.row[h] = row;
    lr.word[h] = (row / L.KP) * (kLdc / 2) + static_cast<int>(threadIdx.x % 4);
    lr.slot[h] = ok ? static_cast<int>(t * K + k) : -1;
    lr.ex[h] = ok ? static_cast<int>(p.experts[lr.slot[h]]) : -1;
    CUDA_KERNEL_ASSERT((!ok || (lr.ex[h] >= 0 && lr.ex[h] < p.E)) &&
                       "expand_act_combine: expert id out of range [0, E)");
    lr.w[h] = ok ? p.weights[lr.slot[h]] : 0.0f;
  }
  return lr;
}

// The block's rank rows [zg | zu] (forward) or [zg | zu | dzd] (backward: grad_zd given) as bf16 rows of sZ by
// position (row perm[pos]), each part zero-padded to its padded rank, zero rows for padding.
__device__ inline void stage_rank_rows(const MmaArgs& p, const TileLayout& L, __nv_bfloat16* sZ, int64_t t0,
                                       const int* perm, const float* grad_zd, int64_t gzd_stride) {
  const int K = static_cast<int>(p.K);
  const int Rgu = L.Rgp + L.Rup;
  const int Rz = L.ldz - kSlabPad;
  for (int idx = threadIdx.x; idx < kTileRows * Rz; idx += blockDim.x) {
    const int pos = idx / Rz;
    const int r = idx - pos * Rz;
    const int row = perm[pos];
    const int64_t t = t0 + row / L.KP;
    const int k = row % L.KP;
    float v = 0.0f;
    if (t < p.T && k < K) {
      const int64_t j = t * K + k;
      if (r < L.Rgp) {
        v = r < p.Rg ? p.zg[j * p.zg_stride + r] : 0.0f;
      } else if (r < Rgu) {
        v = r - L.Rgp < p.Ru ? p.zu[j * p.zu_stride + r - L.Rgp] : 0.0f;
      } else {
        v = r - Rgu < p.Rd ? grad_zd[j * gzd_stride + r - Rgu] : 0.0f;
      }
    }
    sZ[pos * L.ldz + r] = __float2bfloat16_rn(v);
  }
}

// The warp's A tiles of its 16 rank rows: nf 16-wide tiles from column c0 of sZ.
template <int NF>
__device__ __forceinline__ void load_rank_tiles(uint32_t (&a)[NF][4], const __nv_bfloat16* sZ, const TileLayout& L,
                                                int c0, int nf) {
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    if (f < nf) load_a<false>(a[f], sZ + threadIdx.x / 32 * 16 * L.ldz, L.ldz, c0 + f * 16);
  }
}

// Step i0 of the block: the slabs of every expert and the rows of its t1 tokens of G, U and (backward) dH̄.
template <int NF, bool VEC>
__device__ inline void load_tile_step(const MmaArgs& p, const TileLayout& L, unsigned char* sm, int64_t t0, int t1,
                                      int i0, const c10::BFloat16* grad_hbar, int64_t gh_stride) {
  const int I = static_cast<int>(p.I);
  load_b_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sBg), p.Bg, p.Bg_stride0, p.Bg_stride1, static_cast<int>(p.Rg),
                       L.Rgp, L.ldg, 0, L.E, i0, I);
  if (p.U != nullptr) {
    load_b_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sBu), p.Bu, p.Bu_stride0, p.Bu_stride1, static_cast<int>(p.Ru),
                         L.Rup, L.ldu, 0, L.E, i0, I);
    load_rows<VEC>(smem_at<unsigned short>(sm, L.sU), p.U + t0 * p.U_stride, p.U_stride, t1, L.BT, kLdc, i0, I);
  }
  load_ad_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sAd), p.Ad, p.Ad_stride0, p.Ad_stride1, static_cast<int>(p.Rd),
                        L.Rdp, kLdc, 0, L.E, i0, I);
  load_rows<VEC>(smem_at<unsigned short>(sm, L.sG), p.G + t0 * p.G_stride, p.G_stride, t1, L.BT, kLdc, i0, I);
  if (grad_hbar != nullptr) {
    load_rows<VEC>(smem_at<unsigned short>(sm, L.sGH), grad_hbar + t0 * gh_stride, gh_stride, t1, L.BT, kLdc, i0, I);
  }
}

// The shared arrays a token-kernel block reads: the slabs, and the G, U, dH̄ rows as words of two bf16.
struct TileSmem {
  const __nv_bfloat16 *Bg, *Bu, *Ad;
  const unsigned *G, *U, *GH;
};

__device__ __forceinline__ TileSmem tile_smem(unsigned char* sm, const TileLayout& L) {
  return {smem_at<__nv_bfloat16>(sm, L.sBg), smem_at<__nv_bfloat16>(sm, L.sBu), smem_at<__nv_bfloat16>(sm, L.sAd),
          smem_at<unsigned>(sm, L.sG),       smem_at<unsigned>(sm, L.sU),       smem_at<unsigned>(sm, L.sGH)};
}

// The I steps [first, last) of this block's split (blockIdx.x of gridDim.x).
__device__ __forceinline__ void split_steps(int64_t I, int& first, int& last) {
  const int steps = static_cast<int>((I + kMmaCols - 1) / kMmaCols);
  const int per_split = (steps + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  first = static_cast<int>(blockIdx.x) * per_split;
  last = first + per_split < steps ? first + per_split : steps;
}

// a with the rows whose expert is not e zeroed (rows g: a[0], a[2]; rows g + 8: a[1], a[3]).
__device__ __forceinline__ void rows_of_expert(uint32_t (&out)[4], const uint32_t (&a)[4], const LaneRows& lr,
                                               int e) {
  out[0] = lr.ex[0] == e ? a[0] : 0u;
  out[2] = lr.ex[0] == e ? a[2] : 0u;
  out[1] = lr.ex[1] == e ? a[1] : 0u;
  out[3] = lr.ex[1] == e ? a[3] : 0u;
}

// The distinct experts of the warp's rows in increasing order into list (at most 16); returns their count.
// Warp-uniform.
__device__ __forceinline__ int experts_of_warp(const LaneRows& lr, int E, int* list) {
  int n = 0;
  for (int e = 0; e < E; ++e) {
    if (__any_sync(0xffffffffu, lr.ex[0] == e || lr.ex[1] == e)) {
      if (threadIdx.x % 32 == 0) {
        list[n] = e;
      }
      ++n;
    }
  }
  __syncwarp();
  return n;
}

// acc[2 np + h] += A (16 rows x 16 k, tile a) x B (16 k x 16 columns of n tile pair np), B from slab s holding
// element (k, n) at s[n * ld + k], or with K_MAJOR at s[k * ld + n], k from kb, over `pairs` pairs of 8-column tiles.
template <bool K_MAJOR, int NT>
__device__ __forceinline__ void mma_row_tile(float (&acc)[NT][4], const uint32_t (&a)[4], const __nv_bfloat16* s,
                                             int ld, int kb, int pairs) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    if (np < pairs) {
      uint32_t b0[2], b1[2];
      load_b_pair<K_MAJOR>(b0, b1, s, ld, kb, np * 16);
      mma_16816(acc[2 * np], a, b0);
      mma_16816(acc[2 * np + 1], a, b1);
    }
  }
}

// The A tile (16 rows x 16 k) of two C tiles over k 0-7 (c0) and 8-15 (c1), rounded to bf16.
__device__ __forceinline__ void pack_a_tile(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// Element c (0 or 1) of a pair of bf16 in one 32-bit word, as fp32.
__device__ __forceinline__ float bf16_bits_to_float(unsigned w, int c) {
  return static_cast<float>(
      c10::BFloat16(static_cast<uint16_t>(c ? w >> 16 : w & 0xffffu), c10::BFloat16::from_bits()));
}

// dst[t0 + tl][c0 + c] (bf16 rows of I) = the sum over k < K, in k order, of comb[(tl * KP + k) * 16 + c] for the
// tile's t1 tokens and the 16 columns of a chunk (c0 + c < I), 4 columns per thread (one 8-byte store when I % 4 == 0:
// always with VEC, where I % 8 == 0); with dst2 (the backward's dU), likewise dst2 from the slot rows comb2.
template <bool VEC>
__device__ inline void store_chunk_sums(const float* comb, const float* comb2, int K, int KP, int64_t t0, int t1,
                                        int64_t c0, int64_t I, c10::BFloat16* __restrict__ dst,
                                        c10::BFloat16* __restrict__ dst2) {
  const int c = static_cast<int>(threadIdx.x) % 4 * 4;  // a thread's columns are fixed: one offset per token
  if (c0 + c >= I) {
    return;
  }
  const bool whole = VEC || (c0 + c + 4 <= I && I % 4 == 0);
  const auto store = [&](c10::BFloat16* out, const float4& sum) {
    if (whole) {
      *reinterpret_cast<uint2*>(out) = {pack_bf16(sum.x, sum.y), pack_bf16(sum.z, sum.w)};
    } else {
      const float v[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (c0 + c + q < I) {
          out[q] = static_cast<c10::BFloat16>(v[q]);
        }
      }
    }
  };
#pragma unroll 1
  for (int tl = static_cast<int>(threadIdx.x) / 4; tl < t1; tl += kBlock / 4) {
    const int row0 = tl * KP * 16 + c;
    float4 sum = {0.0f, 0.0f, 0.0f, 0.0f};
    float4 sum2 = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      const float4 v = *reinterpret_cast<const float4*>(comb + row0 + k * 16);
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      if (dst2 != nullptr) {
        const float4 v2 = *reinterpret_cast<const float4*>(comb2 + row0 + k * 16);
        sum2.x += v2.x, sum2.y += v2.y, sum2.z += v2.z, sum2.w += v2.w;
      }
    }
    const int64_t at = (t0 + tl) * I + c0 + c;
    store(dst + at, sum);
    if (dst2 != nullptr) {
      store(dst2 + at, sum2);
    }
  }
}

// Forward. Per 16-column chunk, each warp over its 16 rows:
//   g, u = G, U + s z B_e^T  (the warp's z tiles stay in registers across the steps)
//   h = act(g) u;  hbar_t = sum_k w_j h_j
//   zd_j += drop(h_j) Ad_e^T (the accumulators reused as an A tile; zd accumulated in registers across the steps)
// Grid (splits of the I steps, token tiles). Writes hbar for the tile's tokens and columns, and the block's partial
// zd (sum over its columns) by slot into zd_part[split] (S, Rd). NF: 16-wide fragments of the largest padded rank
// (1, 2 or 4), ACT the activation (common.cuh), VEC mma_rows_aligned and DROP dropout on (dispatch_tiles): one
// instantiation each, so that a launch without dropout holds no mask code. __launch_bounds__(256, 2): two blocks per
// SM, as its shared memory allows; with the block size alone ptxas held the NF = 2 and GELU instances to 80
// registers and spilled.
template <int NF, int ACT, bool VEC, bool DROP>
__global__ void __launch_bounds__(kBlock, 2)
eac_fwd_mma_kernel(MmaArgs p, TileLayout L, c10::BFloat16* __restrict__ hbar, float* __restrict__ zd_part) {
  const Dropout drop = static_dropout<DROP>(p.drop);  // no mask code without dropout
  unsigned char* sm = dynamic_smem<unsigned char>();
  const int warp = threadIdx.x / 32;
  const int tq = threadIdx.x % 4;
  const int I = static_cast<int>(p.I);
  const int K = static_cast<int>(p.K);
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * L.BT;
  const int t1 = static_cast<int>(t0 + L.BT < p.T ? L.BT : p.T - t0);  // the tile's tokens
  const bool gated = p.U != nullptr;
  const int* perm = sort_rows_by_expert(p, L, sm, t0);
  const LaneRows lr = lane_rows(p, L, t0, perm);
  __nv_bfloat16* sZ = smem_at<__nv_bfloat16>(sm, L.sZ);
  stage_rank_rows(p, L, sZ, t0, perm, nullptr, 0);
  __syncthreads();
  uint32_t zg_a[NF][4], zu_a[NF][4];
  load_rank_tiles(zg_a, sZ, L, 0, L.Rgp / 16);
  load_rank_tiles(zu_a, sZ, L, L.Rgp, L.Rup / 16);
  int* experts = smem_at<int>(sm, L.sEx) + warp * 16;
  const int nex = experts_of_warp(lr, L.E, experts);
  const TileSmem sh = tile_smem(sm, L);
  float* comb = smem_at<float>(sm, L.sComb);

  float zd[2 * NF][4] = {};
  int first, last;
  split_steps(p.I, first, last);
  for (int step = first; step < last; ++step) {
    const int i0 = step * kMmaCols;
    __syncthreads();  // the previous step's slabs are consumed
    load_tile_step<NF, VEC>(p, L, sm, t0, t1, i0, nullptr, 0);
    __syncthreads();
    const int nch = (I - i0 + 15) / 16 < kMmaCols / 16 ? (I - i0 + 15) / 16 : kMmaCols / 16;  // 16-column chunks
    for (int ch = 0; ch < nch; ++ch) {
      float gacc[2][4] = {};
      float uacc[2][4] = {};
#pragma unroll 1
      for (int q = 0; q < nex; ++q) {
        const int e = experts[q];
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          uint32_t a[4];
          if (f < L.Rgp / 16) {
            rows_of_expert(a, zg_a[f], lr, e);
            mma_row_tile<false>(gacc, a, sh.Bg + (e * kMmaCols + ch * 16) * L.ldg, L.ldg, f * 16, 1);
          }
          if (gated && f < L.Rup / 16) {
            rows_of_expert(a, zu_a[f], lr, e);
            mma_row_tile<false>(uacc, a, sh.Bu + (e * kMmaCols + ch * 16) * L.ldu, L.ldu, f * 16, 1);
          }
        }
      }
      // Elementwise: position warp * 16 + g + 8 h (row lr.row[h]), column i0 + col + c: w h to the chunk's slot
      // rows in shared memory (their token sums are hbar), drop(h) into gacc.
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int cc = nt * 8 + 2 * tq;  // column in the chunk
          const int col = ch * 16 + cc;
          const int word = lr.word[h] + ch * 8 + nt * 4;  // column col
          const unsigned gw = sh.G[word];
          const unsigned uw = gated ? sh.U[word] : 0u;
          float hw[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gv = bf16_bits_to_float(gw, c) + p.scale * gacc[nt][2 * h + c];
            const float uv = gated ? bf16_bits_to_float(uw, c) + p.scale * uacc[nt][2 * h + c] : 1.0f;
            const float hv = act_forward(ACT, gv) * uv;
            hw[c] = lr.w[h] * hv;
            const float mask = dropout_mult(drop, lr.slot[h], p.I, i0 + col + c);
            gacc[nt][2 * h + c] = lr.slot[h] >= 0 ? hv * mask : 0.0f;
          }
          *reinterpret_cast<float2*>(comb + lr.row[h] * 16 + cc) = {hw[0], hw[1]};
        }
      }
      __syncthreads();
      store_chunk_sums<VEC>(comb, nullptr, K, L.KP, t0, t1, i0 + ch * 16, p.I, hbar, nullptr);
      __syncthreads();  // the sums are read before the next chunk's rows are written
      // zd += drop(h) Ad_e^T: drop(h) as the A tile of these 16 columns, per expert of the warp.
      uint32_t ha[4];
      pack_a_tile(ha, gacc[0], gacc[1]);
#pragma unroll 1
      for (int q = 0; q < nex; ++q) {
        const int e = experts[q];
        uint32_t a[4];
        rows_of_expert(a, ha, lr, e);
        mma_row_tile<false>(zd, a, sh.Ad + e * L.Rdp * kLdc, kLdc, ch * 16, L.Rdp / 16);
      }
    }
  }
  // This split's zd partial sums of the lane's rows: ranks 8 nt + 2 tq + c.
  float* out = zd_part + static_cast<int64_t>(blockIdx.x) * p.T * p.K * p.Rd;
#pragma unroll
  for (int nt = 0; nt < 2 * NF; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = nt * 8 + 2 * tq + c;
        if (lr.slot[h] >= 0 && r < p.Rd) {
          out[static_cast<int64_t>(lr.slot[h]) * p.Rd + r] = zd[nt][2 * h + c];
        }
      }
    }
  }
}

// Backward. Per step and 16-column chunk, each warp over its 16 rows:
//   g, u = G, U + s z B_e^T;  b = dzd Ad_e (the Ad slab read k-major: ldmatrix .trans)
//   dh = w dH̄ + drop(b);  dg = dh act'(g) u;  du = dh act(g);  dw += dH̄ act(g) u
//   dG_t, dU_t = sum_k dg_j, du_j
//   dzg += dg Bg_e, dzu += du Bu_e (dg, du as A tiles, the B slabs read k-major; accumulated in registers)
// Grid (splits of the I steps, token tiles). Writes dG, dU for the tile's tokens and columns, and the block's
// partial [dzg/s | dzu/s | dw] (sums over its columns) by slot into part[split] (S, Rg + Ru + 1).
template <int NF, int ACT, bool VEC, bool DROP>
__global__ void __launch_bounds__(kBlock)
eac_bwd_mma_kernel(MmaArgs p, TileLayout L, const c10::BFloat16* __restrict__ grad_hbar, int64_t gh_stride,
                   const float* __restrict__ grad_zd, int64_t gzd_stride, c10::BFloat16* __restrict__ dG,
                   c10::BFloat16* __restrict__ dU, float* __restrict__ part) {
  const Dropout drop = static_dropout<DROP>(p.drop);  // no mask code without dropout
  unsigned char* sm = dynamic_smem<unsigned char>();
  const int K = static_cast<int>(p.K);
  const int warp = threadIdx.x / 32;
  const int tq = threadIdx.x % 4;
  const int I = static_cast<int>(p.I);
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * L.BT;
  const int t1 = static_cast<int>(t0 + L.BT < p.T ? L.BT : p.T - t0);
  const bool gated = p.U != nullptr;
  const int* perm = sort_rows_by_expert(p, L, sm, t0);
  const LaneRows lr = lane_rows(p, L, t0, perm);
  __nv_bfloat16* sZ = smem_at<__nv_bfloat16>(sm, L.sZ);
  stage_rank_rows(p, L, sZ, t0, perm, grad_zd, gzd_stride);
  __syncthreads();
  uint32_t zg_a[NF][4], zu_a[NF][4], zd_a[NF][4];
  load_rank_tiles(zg_a, sZ, L, 0, L.Rgp / 16);
  load_rank_tiles(zu_a, sZ, L, L.Rgp, L.Rup / 16);
  load_rank_tiles(zd_a, sZ, L, L.Rgp + L.Rup, L.Rdp / 16);
  int* experts = smem_at<int>(sm, L.sEx) + warp * 16;
  const int nex = experts_of_warp(lr, L.E, experts);
  const TileSmem sh = tile_smem(sm, L);
  float* comb_g = smem_at<float>(sm, L.sComb);
  float* comb_u = comb_g + kTileRows * 16;

  float dzg[2 * NF][4] = {};
  float dzu[2 * NF][4] = {};
  float dw[2] = {};
  int first, last;
  split_steps(p.I, first, last);
  for (int step = first; step < last; ++step) {
    const int i0 = step * kMmaCols;
    __syncthreads();  // the previous step's slabs are consumed
    load_tile_step<NF, VEC>(p, L, sm, t0, t1, i0, grad_hbar, gh_stride);
    __syncthreads();
    const int nch = (I - i0 + 15) / 16 < kMmaCols / 16 ? (I - i0 + 15) / 16 : kMmaCols / 16;  // 16-column chunks
    for (int ch = 0; ch < nch; ++ch) {
      float gacc[2][4] = {};
      float uacc[2][4] = {};
      float bacc[2][4] = {};
#pragma unroll 1
      for (int q = 0; q < nex; ++q) {
        const int e = experts[q];
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          uint32_t a[4];
          if (f < L.Rgp / 16) {
            rows_of_expert(a, zg_a[f], lr, e);
            mma_row_tile<false>(gacc, a, sh.Bg + (e * kMmaCols + ch * 16) * L.ldg, L.ldg, f * 16, 1);
          }
          if (gated && f < L.Rup / 16) {
            rows_of_expert(a, zu_a[f], lr, e);
            mma_row_tile<false>(uacc, a, sh.Bu + (e * kMmaCols + ch * 16) * L.ldu, L.ldu, f * 16, 1);
          }
          if (f < L.Rdp / 16) {
            rows_of_expert(a, zd_a[f], lr, e);
            mma_row_tile<true>(bacc, a, sh.Ad + e * L.Rdp * kLdc + ch * 16, kLdc, f * 16, 1);
          }
        }
      }
      // Elementwise: position warp * 16 + g + 8 h (row lr.row[h]), column i0 + col + c. Padding rows have zero rank
      // vectors and weight, so dh, dg, du vanish there; columns beyond I read zero dH̄ and zero-padded slabs. dg, du
      // go to the chunk's slot rows in shared memory, whose token sums are stored after the barrier.
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int cc = nt * 8 + 2 * tq;  // column in the chunk
          const int col = ch * 16 + cc;
          const int word = lr.word[h] + ch * 8 + nt * 4;  // column col
          const unsigned gw = sh.G[word];
          const unsigned uw = gated ? sh.U[word] : 0u;
          const unsigned hw = sh.GH[word];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gv = bf16_bits_to_float(gw, c) + p.scale * gacc[nt][2 * h + c];
            const float uv = gated ? bf16_bits_to_float(uw, c) + p.scale * uacc[nt][2 * h + c] : 1.0f;
            const float gh = bf16_bits_to_float(hw, c);
            float a, da;
            act_forward_grad(ACT, gv, a, da);
            const float mask = dropout_mult(drop, lr.slot[h], p.I, i0 + col + c);
            const float dh = lr.w[h] * gh + bacc[nt][2 * h + c] * mask;
            gacc[nt][2 * h + c] = dh * da * uv;
            uacc[nt][2 * h + c] = dh * a;
            dw[h] += gh * (a * uv);
          }
          *reinterpret_cast<float2*>(comb_g + lr.row[h] * 16 + cc) = {gacc[nt][2 * h], gacc[nt][2 * h + 1]};
          *reinterpret_cast<float2*>(comb_u + lr.row[h] * 16 + cc) = {uacc[nt][2 * h], uacc[nt][2 * h + 1]};
        }
      }
      __syncthreads();
      store_chunk_sums<VEC>(comb_g, comb_u, K, L.KP, t0, t1, i0 + ch * 16, p.I, dG, gated ? dU : nullptr);
      __syncthreads();  // the sums are read before the next chunk's rows are written
      uint32_t dga[4], dua[4];
      pack_a_tile(dga, gacc[0], gacc[1]);
      pack_a_tile(dua, uacc[0], uacc[1]);
#pragma unroll 1
      for (int q = 0; q < nex; ++q) {
        const int e = experts[q];
        uint32_t a[4];
        rows_of_expert(a, dga, lr, e);
        mma_row_tile<true>(dzg, a, sh.Bg + (e * kMmaCols + ch * 16) * L.ldg, L.ldg, 0, L.Rgp / 16);
        if (gated) {
          rows_of_expert(a, dua, lr, e);
          mma_row_tile<true>(dzu, a, sh.Bu + (e * kMmaCols + ch * 16) * L.ldu, L.ldu, 0, L.Rup / 16);
        }
      }
    }
  }
  // This split's partial sums of the lane's rows: dzg, dzu at ranks 8 nt + 2 tq + c; dw summed over the row's 4 lanes.
  const int Rg = static_cast<int>(p.Rg), Ru = static_cast<int>(p.Ru);
  const int W = Rg + Ru + 1;
  float* out = part + static_cast<int64_t>(blockIdx.x) * p.T * p.K * W;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    dw[h] += __shfl_xor_sync(0xffffffffu, dw[h], 1);
    dw[h] += __shfl_xor_sync(0xffffffffu, dw[h], 2);
    if (lr.slot[h] < 0) {
      continue;
    }
    float* row = out + static_cast<int64_t>(lr.slot[h]) * W;
#pragma unroll
    for (int nt = 0; nt < 2 * NF; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = nt * 8 + 2 * tq + c;
        if (r < Rg) {
          row[r] = dzg[nt][2 * h + c];
        }
        if (r < Ru) {
          row[Rg + r] = gated ? dzu[nt][2 * h + c] : 0.0f;
        }
      }
    }
    if (tq == 0) {
      row[Rg + Ru] = dw[h];
    }
  }
}

// Weight gradients on register tiles (same eligibility as the kernels above). Grid (64-column tiles of I, experts):
// a block walks its expert's slots in sorted order, 64 at a time. Per chunk, each warp recomputes g, u and
// b = dzd Ad_e for 16 slots x 32 columns (mma_16816, z rows as A tiles), then dg, du and drop(h) into bf16 tiles in
// shared memory; then
//   dBg_e += dg^T zg (warps 0-3), dBu_e += du^T zu (warps 4-7): 16 columns x rank per warp
//   dAd_e += dzd^T drop(h): rank tiles x 16 columns, spread over the warps
// with both operands read k-major (ldmatrix .trans) and fp32 operands rounded to bf16 (as the token kernels round
// theirs). The outputs stay in registers across the chunks; fixed slot order, no atomics.
constexpr int kWgSlots = 64;

struct WgLayout {
  int Rgp, Rup, Rdp, ldz, ldg, ldu;  // padded ranks; row strides (bf16) of the rank rows and the Bg / Bu slabs
  int slot, tok, wsl, z, sBg, sBu, sAd, sG, sU, sGH, prod;
  size_t bytes;
};

__host__ __device__ inline WgLayout make_wg_layout(int64_t Rg, int64_t Ru, int64_t Rd) {
  WgLayout L{};
  L.Rgp = round16(static_cast<int>(Rg < 4096 ? Rg : 4096));
  L.Rup = round16(static_cast<int>(Ru < 4096 ? Ru : 4096));
  L.Rdp = round16(static_cast<int>(Rd < 4096 ? Rd : 4096));
  L.ldz = L.Rgp + L.Rup + L.Rdp + kSlabPad;
  L.ldg = L.Rgp + kSlabPad;
  L.ldu = L.Rup + kSlabPad;
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const int off = static_cast<int>(at);
    at += (bytes + 127) / 128 * 128;
    return off;
  };
  const size_t tile = static_cast<size_t>(kWgSlots) * kLdc * 2;  // 64 rows of 64 bf16 columns, padded
  L.slot = take(kWgSlots * sizeof(int));
  L.tok = take(kWgSlots * sizeof(int));
  L.wsl = take(kWgSlots * sizeof(float));
  L.z = take(static_cast<size_t>(kWgSlots) * L.ldz * 2);
  L.sBg = take(static_cast<size_t>(kMmaCols) * L.ldg * 2);
  L.sBu = take(static_cast<size_t>(kMmaCols) * L.ldu * 2);
  L.sAd = take(static_cast<size_t>(L.Rdp) * kLdc * 2);
  L.sG = take(tile);
  L.sU = take(tile);
  L.sGH = take(tile);
  L.prod = take(3 * tile);  // dg, du, drop(h)
  L.bytes = at;
  return L;
}

// The tensor-core path takes the problem when the padded ranks fit its register tiles, K <= 8 (KP slot rows per
// token in a 128-row tile) and each kernel's shared memory fits sm_90's 227 KiB (E 8, K 2, R 16: ~96 KiB forward,
// ~110 KiB backward, ~70 KiB weight gradients).
__host__ __device__ inline bool mma_fits(int64_t K, int64_t E, int64_t Rg, int64_t Ru, int64_t Rd) {
  if (Rg > kMmaMaxRank || Ru > kMmaMaxRank || Rd > kMmaMaxRank || K > 8 || E > 4096) {
    return false;
  }
  return make_tile_layout(K, E, Rg, Ru, Rd, false).bytes <= kMmaMaxSmem &&
         make_tile_layout(K, E, Rg, Ru, Rd, true).bytes <= kMmaMaxSmem &&
         make_wg_layout(Rg, Ru, Rd).bytes <= kMmaMaxSmem;
}

// Two blocks per SM (at most 128 registers), except at rank 64, whose tiles need more. VEC: mma_rows_aligned and
// rank_rows_aligned (the fp32 rank rows move 4 values per load).
template <int NF, int ACT, bool VEC, bool DROP>
__global__ void __launch_bounds__(kBlock, NF < 4 ? 2 : 1)
eac_bwd_weight_mma_kernel(MmaArgs p, WgLayout L, const c10::BFloat16* __restrict__ grad_hbar, int64_t gh_stride,
                          const float* __restrict__ grad_zd, int64_t gzd_stride, float* __restrict__ dBg,
                          float* __restrict__ dBu, float* __restrict__ dAd) {
  const Dropout drop = static_dropout<DROP>(p.drop);  // no mask code without dropout
  unsigned char* sm = dynamic_smem<unsigned char>();
  int* slot = smem_at<int>(sm, L.slot);
  int* tok = smem_at<int>(sm, L.tok);
  float* wsl = smem_at<float>(sm, L.wsl);
  __nv_bfloat16* z = smem_at<__nv_bfloat16>(sm, L.z);
  unsigned short* sG = smem_at<unsigned short>(sm, L.sG);
  unsigned short* sU = smem_at<unsigned short>(sm, L.sU);
  unsigned short* sGH = smem_at<unsigned short>(sm, L.sGH);
  unsigned* prod = smem_at<unsigned>(sm, L.prod);  // [dg | du | drop(h)] tiles, words of two bf16
  const __nv_bfloat16* prod_bf = smem_at<__nv_bfloat16>(sm, L.prod);
  const __nv_bfloat16* sBg = smem_at<__nv_bfloat16>(sm, L.sBg);
  const __nv_bfloat16* sBu = smem_at<__nv_bfloat16>(sm, L.sBu);
  const __nv_bfloat16* sAd = smem_at<__nv_bfloat16>(sm, L.sAd);
  const int warp = threadIdx.x / 32;
  const int g = threadIdx.x % 32 / 4;
  const int tq = threadIdx.x % 4;
  const int I = static_cast<int>(p.I);
  const int K = static_cast<int>(p.K);
  const int Rg = static_cast<int>(p.Rg), Ru = static_cast<int>(p.Ru), Rd = static_cast<int>(p.Rd);
  const int i0 = static_cast<int>(blockIdx.x) * kMmaCols;
  const int e = static_cast<int>(blockIdx.y);
  const int Rgu = L.Rgp + L.Rup;
  const bool gated = p.U != nullptr;
  const int tile_words = kWgSlots * kLdc / 2;
  load_b_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sBg), p.Bg, p.Bg_stride0, p.Bg_stride1, Rg, L.Rgp, L.ldg, e,
                       1, i0, I);
  load_b_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sBu), p.Bu, p.Bu_stride0, p.Bu_stride1, Ru, L.Rup, L.ldu, e,
                       1, i0, I);
  load_ad_slab<NF, VEC>(smem_at<unsigned short>(sm, L.sAd), p.Ad, p.Ad_stride0, p.Ad_stride1, Rd, L.Rdp, kLdc, e,
                        1, i0, I);
  // Phase A: this warp's 16 slot rows m0.. and 32 columns n0..; phase B: the 16 columns cb.. of dBg (warps 0-3) or
  // dBu (warps 4-7), and dAd's rank tiles warp / 4 + 2 j at those columns.
  const int m0 = warp % 4 * 16;
  const int n0 = warp / 4 * 32;
  const int cb = warp % 4 * 16;
  const bool up = warp >= 4;
  float accw[2 * NF][4] = {};
  float acca[2][2][4] = {};
  const int64_t start = p.offsets[e];
  const int64_t end = p.offsets[e + 1];
  const int64_t num_slots = p.T * p.K;
  for (int64_t c0 = start; c0 < end; c0 += kWgSlots) {
    __syncthreads();  // the previous chunk's tiles are consumed (and, first, the slabs are written)
    if (threadIdx.x < kWgSlots) {
      int s = -1;
      if (c0 + threadIdx.x < end) {
        const int64_t j = p.order[c0 + threadIdx.x];
        CUDA_KERNEL_ASSERT(j >= 0 && j < num_slots && "expand_act_combine_backward: order holds a slot id out of range");
        s = static_cast<int>(j);
      }
      slot[threadIdx.x] = s;
      tok[threadIdx.x] = s >= 0 ? s / K : 0;
      wsl[threadIdx.x] = s >= 0 ? p.weights[s] : 0.0f;
    }
    __syncthreads();
    // The chunk's rank rows [zg | zu | dzd] as bf16, zero-padded: 4 threads per slot row.
    static_assert(kBlock == 4 * kWgSlots, "eac_bwd_weight_mma_kernel stages a slot row per 4 threads");
    if constexpr (VEC) {
      // 4 consecutive ranks of each part per thread and 16-rank group (rank_rows_aligned: runs of 4 fp32, 16-byte
      // aligned).
      const int s = slot[threadIdx.x / 4];
      const int64_t sr = s < 0 ? 0 : s;
      __nv_bfloat16* row = z + threadIdx.x / 4 * L.ldz;
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        const int r = threadIdx.x % 4 * 4 + 16 * j;
        stage4_bf16(row + r, p.zg + sr * p.zg_stride + r, s >= 0 && r < Rg, r < L.Rgp);
        stage4_bf16(row + L.Rgp + r, p.zu + sr * p.zu_stride + r, s >= 0 && r < Ru, r < L.Rup);
        stage4_bf16(row + Rgu + r, grad_zd + sr * gzd_stride + r, s >= 0 && r < Rd, r < L.Rdp);
      }
    } else {
      const int s = slot[threadIdx.x / 4];
      __nv_bfloat16* row = z + threadIdx.x / 4 * L.ldz;
#pragma unroll
      for (int j = 0; j < 4 * NF; ++j) {  // ranks r = threadIdx.x % 4 + 4 j of each part, below its padded rank
        const int r = threadIdx.x % 4 + 4 * j;
        if (r < L.Rgp) {
          row[r] = __float2bfloat16_rn(s >= 0 && r < Rg ? p.zg[s * p.zg_stride + r] : 0.0f);
        }
        if (r < L.Rup) {
          row[L.Rgp + r] = __float2bfloat16_rn(s >= 0 && r < Ru ? p.zu[s * p.zu_stride + r] : 0.0f);
        }
        if (r < L.Rdp) {
          row[Rgu + r] = __float2bfloat16_rn(s >= 0 && r < Rd ? grad_zd[s * gzd_stride + r] : 0.0f);
        }
      }
    }
    {
      // The chunk's slot rows of G, U, dH̄ (by token): a thread's 8 columns are fixed, its rows q 32 apart.
      const int c = static_cast<int>(threadIdx.x) % (kMmaCols / 8) * 8;
      const int nc = clamp8(I - i0 - c);
      constexpr int kSlotRowsPerPass = kBlock / (kMmaCols / 8);
#pragma unroll 1
      for (int j = 0; j < kWgSlots / kSlotRowsPerPass; ++j) {
        const int q = static_cast<int>(threadIdx.x) / (kMmaCols / 8) + j * kSlotRowsPerPass;
        const int n = slot[q] >= 0 ? nc : 0;
        const int64_t t = tok[q];
        copy8<VEC>(sG + q * kLdc + c, p.G + (n > 0 ? t * p.G_stride + i0 + c : 0), n);
        copy8<VEC>(sU + q * kLdc + c, gated ? p.U + (n > 0 ? t * p.U_stride + i0 + c : 0) : p.G, gated ? n : 0);
        copy8<VEC>(sGH + q * kLdc + c, grad_hbar + (n > 0 ? t * gh_stride + i0 + c : 0), n);
      }
    }
    __syncthreads();
    {
      // Phase A: g, u, b of the warp's 16 slots x 32 columns, then dg, du, drop(h) to the bf16 tiles.
      const __nv_bfloat16* zrows = z + m0 * L.ldz;
      float gacc[4][4] = {};
      float uacc[4][4] = {};
      float bacc[4][4] = {};
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        uint32_t a[4];
        if (f < L.Rgp / 16) {
          load_a<false>(a, zrows, L.ldz, f * 16);
          mma_row_tile<false>(gacc, a, sBg + n0 * L.ldg, L.ldg, f * 16, 2);
        }
        if (gated && f < L.Rup / 16) {
          load_a<false>(a, zrows, L.ldz, L.Rgp + f * 16);
          mma_row_tile<false>(uacc, a, sBu + n0 * L.ldu, L.ldu, f * 16, 2);
        }
        if (f < L.Rdp / 16) {
          load_a<false>(a, zrows, L.ldz, Rgu + f * 16);
          mma_row_tile<true>(bacc, a, sAd + n0, kLdc, f * 16, 2);
        }
      }
      const unsigned* gwords = reinterpret_cast<const unsigned*>(sG);
      const unsigned* uwords = reinterpret_cast<const unsigned*>(sU);
      const unsigned* hwords = reinterpret_cast<const unsigned*>(sGH);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int q = m0 + g + 8 * h;
          const int s = slot[q];
          const int col = n0 + nt * 8 + 2 * tq;
          const int word = (q * kLdc + col) / 2;
          const unsigned gw = gwords[word];
          const unsigned uw = gated ? uwords[word] : 0u;
          const unsigned hw = hwords[word];
          // Without dropout, no test for padding slots (s < 0) or columns beyond I: a padding slot's rank rows,
          // weight, G, U and dH̄ are staged as zeros (finite values), so its dg, du, drop(h) meet zero rows of zg,
          // zu, dzd in phase B, and columns beyond I are never stored. The dropout instances keep the test: their
          // mask hash needs the registers that the branch-free form would spill.
          float dg[2], du[2], hin[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            dg[c] = du[c] = hin[c] = 0.0f;
            if (!DROP || (s >= 0 && i0 + col + c < I)) {
              const float gv = bf16_bits_to_float(gw, c) + p.scale * gacc[nt][2 * h + c];
              const float uv = gated ? bf16_bits_to_float(uw, c) + p.scale * uacc[nt][2 * h + c] : 1.0f;
              const float gh = bf16_bits_to_float(hw, c);
              float a, da;
              act_forward_grad(ACT, gv, a, da);
              const float mask = dropout_mult(drop, s, p.I, i0 + col + c);
              const float dh = wsl[q] * gh + bacc[nt][2 * h + c] * mask;
              dg[c] = dh * da * uv;
              du[c] = dh * a;
              hin[c] = a * uv * mask;
            }
          }
          prod[word] = pack_bf16(dg[0], dg[1]);
          prod[tile_words + word] = pack_bf16(du[0], du[1]);
          prod[2 * tile_words + word] = pack_bf16(hin[0], hin[1]);
        }
      }
    }
    __syncthreads();
    // Phase B over the chunk's 64 slots, 16 per k step.
#pragma unroll
    for (int kk = 0; kk < kWgSlots / 16; ++kk) {
      uint32_t a[4];
      if (!up || gated) {
        // A = dg^T or du^T (16 columns x 16 slots), B = zg or zu (16 slots x rank).
        load_a<true>(a, prod_bf + (up ? kWgSlots * kLdc : 0) + cb, kLdc, kk * 16);
        mma_row_tile<true>(accw, a, z + (up ? L.Rgp : 0), L.ldz, kk * 16, (up ? L.Rup : L.Rgp) / 16);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int f = warp / 4 + 2 * j;
        if (f < L.Rdp / 16) {
          // A = dzd^T (16 ranks x 16 slots), B = drop(h) (16 slots x 16 columns).
          load_a<true>(a, z + Rgu + f * 16, L.ldz, kk * 16);
          mma_row_tile<true>(acca[j], a, prod_bf + 2 * kWgSlots * kLdc + cb, kLdc, kk * 16, 1);
        }
      }
    }
  }
  // Every block writes its whole tile (zeros for an empty expert), so no memset is needed. Lane element (row g + 8 h,
  // column 8 nt + 2 tq + c) of each output tile.
  const int R = up ? Ru : Rg;
  float* outw = up ? dBu : dBg;
#pragma unroll
  for (int nt = 0; nt < 2 * NF; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = i0 + cb + g + 8 * h;
        const int r = nt * 8 + 2 * tq + c;
        if (i < I && r < R) {
          outw[(static_cast<int64_t>(e) * I + i) * R + r] = p.scale * accw[nt][2 * h + c];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int r = (warp / 4 + 2 * j) * 16 + g + 8 * h;
          const int i = i0 + cb + nt * 8 + 2 * tq + c;
          if (r < Rd && i < I) {
            dAd[(static_cast<int64_t>(e) * Rd + r) * I + i] = acca[j][nt][2 * h + c];
          }
        }
      }
    }
  }
}

// out = sum over the `splits` partial sums part[split] (n values each), in split order; `scale` multiplies the
// columns c < scaled_cols of each row of `cols` values (the rank gradients), and the result is scattered into up
// to three column ranges: [0, n0) -> out0, [n0, n0 + n1) -> out1, the rest -> out2 (row-major, contiguous).
__global__ void __launch_bounds__(kBlock)
eac_split_sum_kernel(const float* __restrict__ part, int splits, int64_t rows, int cols, int n0, int n1,
                     float scale, int scaled_cols, float* __restrict__ out0, float* __restrict__ out1,
                     float* __restrict__ out2) {
  const int64_t n = rows * cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
      sum += part[s * n + idx];
    }
    const int64_t j = idx / cols;
    const int c = static_cast<int>(idx - j * cols);
    if (c < scaled_cols) {
      sum *= scale;
    }
    if (c < n0) {
      out0[j * n0 + c] = sum;
    } else if (c < n0 + n1) {
      out1[j * n1 + c - n0] = sum;
    } else {
      out2[j * (cols - n0 - n1) + c - n0 - n1] = sum;
    }
  }
}

}  // namespace
}  // namespace mixlora
