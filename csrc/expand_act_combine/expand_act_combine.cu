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
  extern __shared__ float z_rows[];  // K x (Rg + Ru): [zg_j | zu_j] of the token's slots
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
  extern __shared__ float rows[];  // K x (Rg + Ru + Rd): [zg_j | zu_j | dzd_j] of the token's slots
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
  extern __shared__ float Z[];  // kChunkSlots x (Rg + Ru + Rd): [zg_j | zu_j | dzd_j]
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
