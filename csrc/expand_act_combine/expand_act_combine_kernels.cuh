// The device code of expand_act_combine: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in expand_act_combine.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kPass = 32;        // reduction outputs per pass in the token kernels
constexpr int kChunkSlots = 16;  // weight-gradient kernel: slots per shared tile
constexpr size_t kMaxSmem = 48 * 1024;  // per-block limit without a cudaFuncSetAttribute opt-in
constexpr size_t kTokenStaticSmem = (kWarps + 1) * kPass * sizeof(float);
constexpr size_t kWeightStaticSmem = 3 * kChunkSlots * kLd * sizeof(float) + kChunkSlots * sizeof(int64_t);

template <typename scalar_t>
struct Args {
  const scalar_t* G;
  int64_t G_stride;
  const scalar_t* U;  // nullptr: ungated, h = act(g)
  int64_t U_stride;
  const float* zg;
  int64_t zg_stride;
  const float* zu;
  int64_t zu_stride;
  const float* Bg;
  int64_t Bg_stride0, Bg_stride1;
  const float* Bu;
  int64_t Bu_stride0, Bu_stride1;
  const float* Ad;
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
template <typename scalar_t>
__device__ __forceinline__ void recompute(const Args<scalar_t>& p, float Gi, float Ui, const float* zg_row,
                                          const float* zu_row, int64_t e, int64_t i, float& g, float& u,
                                          float& a) {
  const float* bg = p.Bg + e * p.Bg_stride0 + i * p.Bg_stride1;
  float sg = 0.0f;
  for (int64_t r = 0; r < p.Rg; ++r) {
    sg = fmaf(bg[r], zg_row[r], sg);
  }
  g = Gi + p.scale * sg;
  u = 1.0f;
  if (p.U != nullptr) {
    const float* bu = p.Bu + e * p.Bu_stride0 + i * p.Bu_stride1;
    float su = 0.0f;
    for (int64_t r = 0; r < p.Ru; ++r) {
      su = fmaf(bu[r], zu_row[r], su);
    }
    u = Ui + p.scale * su;
  }
  a = act_forward(p.act, g);
}

// Backward elementwise chain at column i of slot j (expert e, weight w): h, dg, du, and the dropout multiplier.
template <typename scalar_t>
__device__ __forceinline__ void slot_backward(const Args<scalar_t>& p, float Gi, float Ui, float gh,
                                              const float* zg_row, const float* zu_row, const float* dzd_row,
                                              int64_t j, int64_t e, float w, int64_t i, float& h, float& dg,
                                              float& du, float& mask) {
  float g, u, a;
  recompute(p, Gi, Ui, zg_row, zu_row, e, i, g, u, a);
  h = a * u;
  mask = dropout_mult(p.drop, j, p.I, i);
  float bd = 0.0f;
  const float* ad = p.Ad + e * p.Ad_stride0 + i;
  for (int64_t r = 0; r < p.Rd; ++r) {
    bd = fmaf(ad[r * p.Ad_stride1], dzd_row[r], bd);
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
eac_fwd_kernel(Args<scalar_t> p, scalar_t* __restrict__ hbar, float* __restrict__ zd) {
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
    const float* ad = p.Ad + e * p.Ad_stride0;
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
            part[c] = fmaf(ad[(r0 + c) * p.Ad_stride1 + i], hm, part[c]);
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
eac_bwd_token_kernel(Args<scalar_t> p, const scalar_t* __restrict__ grad_hbar, int64_t gh_stride,
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
    const float* bg = p.Bg + e * p.Bg_stride0;
    const float* bu = p.Bu + e * p.Bu_stride0;
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
            part[c] = fmaf(dg, bg[i * p.Bg_stride1 + col], part[c]);
          } else if (col < Rz) {
            part[c] = fmaf(du, bu[i * p.Bu_stride1 + col - p.Rg], part[c]);
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
eac_bwd_weight_kernel(Args<scalar_t> p, const scalar_t* __restrict__ grad_hbar, int64_t gh_stride,
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

}  // namespace
}  // namespace mixlora
