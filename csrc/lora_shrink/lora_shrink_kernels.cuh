// The device code of lora_shrink: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in lora_shrink.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kChunkH = 32;     // forward: H chunk per shared tile (64 rows x 32 = 8 loads per thread)
constexpr int kChunkSlots = 16;  // dA: slots per shared tile (16 x 64 = 4 loads per thread)

// weight_t: A's dtype, x's (read as it is) or float (api.cpp's copy of an A of another dtype); likewise below.
template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
lora_shrink_fwd_kernel(const scalar_t* __restrict__ x, int64_t x_stride, const weight_t* __restrict__ A,
                       int64_t A_stride0, int64_t A_stride1, const int64_t* __restrict__ order,
                       const int64_t* __restrict__ offsets, int64_t num_experts, int64_t num_slots, int64_t K,
                       int64_t H, int64_t R, Dropout drop, float* __restrict__ z) {
  __shared__ float P[kChunkH * kLd];  // x rows, [h][row]
  __shared__ float Q[kChunkH * kLd];  // A_e slice, [h][rank]
  __shared__ int64_t row_slot[kTileM];

  int64_t expert, start, end;
  if (!find_segment_tile(offsets, num_experts, blockIdx.x, kTileM, expert, start, end)) {
    return;
  }
  const int tid = threadIdx.x;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int ncols = static_cast<int>(R - rank0 < kTileN ? R - rank0 : kTileN);
  if (tid < kTileM) {
    int64_t slot = -1;
    if (start + tid < end) {
      slot = order[start + tid];
      CUDA_KERNEL_ASSERT(slot >= 0 && slot < num_slots && "lora_shrink: order holds a slot id out of range");
    }
    row_slot[tid] = slot;
  }
  __syncthreads();

  const int m = tid % kTileM;
  const int cg = tid / kTileM;
  const int kk = tid % kChunkH;
  float acc[kPerThread] = {};
  const weight_t* A_e = A + expert * A_stride0;
  for (int64_t h0 = 0; h0 < H; h0 += kChunkH) {
    const int64_t h = h0 + kk;
    // 64 rows x 32 h: 8 rows per thread, each warp reads 32 consecutive h of one row (coalesced).
#pragma unroll
    for (int it = 0; it < kTileM * kChunkH / kBlock; ++it) {
      const int row = tid / kChunkH + it * (kBlock / kChunkH);
      const int64_t slot = row_slot[row];
      float v = 0.0f;
      if (slot >= 0 && h < H) {
        v = static_cast<float>(x[(slot / K) * x_stride + h]) * dropout_mult(drop, slot, H, h);
      }
      P[kk * kLd + row] = v;
    }
#pragma unroll
    for (int it = 0; it < kTileN * kChunkH / kBlock; ++it) {
      const int n = tid / kChunkH + it * (kBlock / kChunkH);
      Q[kk * kLd + n] = (n < ncols && h < H) ? static_cast<float>(A_e[(rank0 + n) * A_stride1 + h]) : 0.0f;
    }
    __syncthreads();
    tile_fma(P, Q, kLd, m, cg, ncols, static_cast<int>(H - h0 < kChunkH ? H - h0 : kChunkH), acc);
    __syncthreads();
  }
  const int64_t slot = row_slot[m];
  if (slot >= 0) {
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int c = cg + kColGroups * q;
      if (c < ncols) {
        z[slot * R + rank0 + c] = acc[q];
      }
    }
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kBlock)
lora_shrink_bwd_dx_kernel(const float* __restrict__ grad_z, int64_t gz_stride, const weight_t* __restrict__ A,
                          int64_t A_stride0, int64_t A_stride1, const int64_t* __restrict__ experts,
                          int64_t num_experts, int64_t K, int64_t H, int64_t R, Dropout drop,
                          scalar_t* __restrict__ dx) {
  float* dz = dynamic_smem<float>();  // K x R rows of this token's slots
  const int64_t t = blockIdx.x;
  for (int64_t idx = threadIdx.x; idx < K * R; idx += blockDim.x) {
    const int64_t k = idx / R;
    dz[idx] = grad_z[(t * K + k) * gz_stride + idx % R];
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = experts[t * K + k];
      CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "lora_shrink_backward: expert id out of range [0, E)");
      const weight_t* A_e = A + e * A_stride0 + h;
      float s = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        s = fmaf(static_cast<float>(A_e[r * A_stride1]), dz[k * R + r], s);
      }
      acc += s * dropout_mult(drop, t * K + k, H, h);
    }
    dx[t * H + h] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
lora_shrink_bwd_dA_kernel(const float* __restrict__ grad_z, int64_t gz_stride, const scalar_t* __restrict__ x,
                          int64_t x_stride, const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                          int64_t num_slots, int64_t K, int64_t H, int64_t R, Dropout drop,
                          float* __restrict__ dA) {
  __shared__ float P[kChunkSlots * kLd];  // drop(x) rows, [slot][h]
  __shared__ float Q[kChunkSlots * kLd];  // dz rows, [slot][rank]
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
        CUDA_KERNEL_ASSERT(slot >= 0 && slot < num_slots && "lora_shrink_backward: order holds a slot id out of range");
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
          p = static_cast<float>(x[(slot / K) * x_stride + h]) * dropout_mult(drop, slot, H, h);
        }
        if (m < ncols) {
          q = grad_z[slot * gz_stride + rank0 + m];
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
        dA[(expert * R + rank0 + c) * H + h] = acc[q];
      }
    }
  }
}

}  // namespace
}  // namespace mixlora
