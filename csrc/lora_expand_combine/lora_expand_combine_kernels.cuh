// The device code of lora_expand_combine: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in lora_expand_combine.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kChunkSlots = 16;
constexpr int kRanksPerPass = 32;  // q: ranks reduced per pass over dy_t (32 fp32 partial sums per thread)

// weight_t: B's dtype (read as it is, fp32 accumulation).
template <typename weight_t>
__global__ void __launch_bounds__(kBlock)
lora_expand_combine_fwd_kernel(const float* __restrict__ zd, int64_t zd_stride, const weight_t* __restrict__ B,
                               int64_t B_stride0, int64_t B_stride1, const float* __restrict__ weights,
                               const int64_t* __restrict__ experts, int64_t num_experts, int64_t K, int64_t H,
                               int64_t R, float scale, float* __restrict__ y) {
  float* z_rows = dynamic_smem<float>();  // K x R
  const int64_t t = blockIdx.x;
  for (int64_t idx = threadIdx.x; idx < K * R; idx += blockDim.x) {
    z_rows[idx] = zd[(t * K + idx / R) * zd_stride + idx % R];
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = experts[t * K + k];
      CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "lora_expand_combine: expert id out of range [0, E)");
      const weight_t* B_row = B + e * B_stride0 + h * B_stride1;
      float s = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        s = fmaf(static_cast<float>(B_row[r]), z_rows[k * R + r], s);
      }
      acc += s * weights[t * K + k];
    }
    y[t * H + h] = scale * acc;
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
lora_expand_combine_bwd_q_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_stride,
                                 const float* __restrict__ zd, int64_t zd_stride, const weight_t* __restrict__ B,
                                 int64_t B_stride0, int64_t B_stride1, const float* __restrict__ weights,
                                 const int64_t* __restrict__ experts, int64_t num_experts, int64_t K, int64_t H,
                                 int64_t R, float scale, float* __restrict__ dzd, float* __restrict__ dweights) {
  float* q = dynamic_smem<float>();  // R
  __shared__ float red[kWarps * kRanksPerPass];
  __shared__ float sums[kRanksPerPass];
  const int64_t t = blockIdx.x;
  const scalar_t* dy = grad_y + t * gy_stride;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t j = t * K + k;
    const int64_t e = experts[j];
    CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "lora_expand_combine_backward: expert id out of range [0, E)");
    const weight_t* B_e = B + e * B_stride0;
    for (int64_t r0 = 0; r0 < R; r0 += kRanksPerPass) {
      float part[kRanksPerPass] = {};
      for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        const float d = static_cast<float>(dy[h]);
        const weight_t* B_row = B_e + h * B_stride1 + r0;
#pragma unroll
        for (int c = 0; c < kRanksPerPass; ++c) {
          if (r0 + c < R) {
            part[c] = fmaf(static_cast<float>(B_row[c]), d, part[c]);
          }
        }
      }
      block_sum(part, red, sums);
      if (threadIdx.x < kRanksPerPass && r0 + threadIdx.x < R) {
        q[r0 + threadIdx.x] = scale * sums[threadIdx.x];
      }
    }
    __syncthreads();
    const float w = weights[j];
    for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
      dzd[j * R + r] = w * q[r];
    }
    if (threadIdx.x == 0) {
      float dw = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        dw = fmaf(q[r], zd[j * zd_stride + r], dw);
      }
      dweights[j] = dw;
    }
    __syncthreads();  // q is rewritten by the next slot
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
lora_expand_combine_bwd_dB_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_stride,
                                  const float* __restrict__ zd, int64_t zd_stride, const float* __restrict__ weights,
                                  const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                  int64_t num_slots, int64_t K, int64_t H, int64_t R, float scale,
                                  float* __restrict__ dB) {
  __shared__ float P[kChunkSlots * kLd];  // w_j dy_t rows, [slot][h]
  __shared__ float Q[kChunkSlots * kLd];  // zd rows, [slot][rank]
  __shared__ int64_t chunk_slot[kChunkSlots];
  const int tid = threadIdx.x;
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t expert = blockIdx.y;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.z) * kTileN;
  const int ncols = static_cast<int>(R - rank0 < kTileN ? R - rank0 : kTileN);
  const int64_t start = offsets[expert];
  const int64_t end = offsets[expert + 1];
  const int m = tid % kTileM;
  const int cg = tid / kTileM;
  float acc[kPerThread] = {};
  for (int64_t s0 = start; s0 < end; s0 += kChunkSlots) {
    if (tid < kChunkSlots) {
      int64_t slot = -1;
      if (s0 + tid < end) {
        slot = order[s0 + tid];
        CUDA_KERNEL_ASSERT(slot >= 0 && slot < num_slots &&
                           "lora_expand_combine_backward: order holds a slot id out of range");
      }
      chunk_slot[tid] = slot;
    }
    __syncthreads();
#pragma unroll
    for (int it = 0; it < kChunkSlots * kTileM / kBlock; ++it) {
      const int s = tid / kTileM + it * kColGroups;
      const int64_t slot = chunk_slot[s];
      const int64_t h = h0 + m;
      float p = 0.0f;
      float q = 0.0f;
      if (slot >= 0) {
        if (h < H) {
          p = weights[slot] * static_cast<float>(grad_y[(slot / K) * gy_stride + h]);
        }
        if (m < ncols) {
          q = zd[slot * zd_stride + rank0 + m];
        }
      }
      P[s * kLd + m] = p;
      Q[s * kLd + m] = q;
    }
    __syncthreads();
    tile_fma(P, Q, kLd, m, cg, ncols, kChunkSlots, acc);
    __syncthreads();
  }
  const int64_t h = h0 + m;
  if (h < H) {
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int c = cg + kColGroups * q;
      if (c < ncols) {
        dB[(expert * H + h) * R + rank0 + c] = scale * acc[q];
      }
    }
  }
}

}  // namespace
}  // namespace mixlora
