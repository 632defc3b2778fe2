// The device code of router_logits: kernels and device helpers. The algorithm and the launch configuration are
// described in router_logits.cu, which includes this file and launches the kernels. Free of torch and of host
// launch code, so that tests/cuda_cpu can compile the same text for the CPU. Included by one translation unit per
// library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "common.cuh"

namespace mixlora {
namespace {

// Every router kernel: kBlock threads (8 warps); lane l owns the 8 columns h0 + 8 l of a kRouterCols-column step,
// and a thread's registers hold one fp32 value per (expert of a group of kRouterExperts, column).
constexpr int kRouterCols = 256;
constexpr int kRouterExperts = 8;
static_assert(kRouterExperts == kWarps, "router_logits_fwd_kernel stages one expert's W row per warp");
// Forward: rows of x per warp (4 x 8 fp32 logit partials per lane) and per block.
constexpr int kRouterFwdRows = 4;
constexpr int kRouterFwdBlockRows = kWarps * kRouterFwdRows;  // 32
// Backward: rows per dx block (a warp takes every kWarps-th), and rows per dW partial (a fixed chunk of T: the
// summation order depends on T alone).
constexpr int kRouterDxRows = 128;
constexpr int kRouterChunkT = 256;

// v[0..8) = row[c0 .. c0 + 8) widened to fp32, zeros past column c0 + n (n <= 0: all zeros). VEC (checked by the
// launcher): rows 16-byte aligned and a multiple of 8 long, so the 8 elements are all present (n >= 8) or all absent,
// and are one 16-byte load (16-bit types) or two (fp32); the instance holds no per-element code.
template <typename scalar_t, bool VEC>
__device__ __forceinline__ void load8_float(const scalar_t* __restrict__ row, int64_t c0, int64_t n, float (&v)[8]) {
  if constexpr (VEC) {
    scalar_t e[8];
    if (n <= 0) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = 0.0f;
      }
      return;
    }
    if constexpr (sizeof(scalar_t) == 2) {
      *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(row + c0);
    } else {
      reinterpret_cast<float4*>(e)[0] = reinterpret_cast<const float4*>(row + c0)[0];
      reinterpret_cast<float4*>(e)[1] = reinterpret_cast<const float4*>(row + c0)[1];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = static_cast<float>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = j < n ? static_cast<float>(row[c0 + j]) : 0.0f;
    }
  }
}

// row[c0 .. c0 + min(n, 8)) = v rounded to scalar_t, for n > 0 (VEC as for load8_float: one or two 16-byte
// stores).
template <typename scalar_t, bool VEC>
__device__ __forceinline__ void store8(scalar_t* __restrict__ row, int64_t c0, int64_t n, const float (&v)[8]) {
  scalar_t e[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    e[j] = static_cast<scalar_t>(v[j]);
  }
  if constexpr (VEC) {
    if constexpr (sizeof(scalar_t) == 2) {
      *reinterpret_cast<uint4*>(row + c0) = *reinterpret_cast<const uint4*>(e);
    } else {
      reinterpret_cast<float4*>(row + c0)[0] = reinterpret_cast<const float4*>(e)[0];
      reinterpret_cast<float4*>(row + c0)[1] = reinterpret_cast<const float4*>(e)[1];
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < n) {
        row[c0 + j] = e[j];
      }
    }
  }
}

// Host side: whether rows of H elements at ptr, stride apart, take the kernels' VEC instance (load8_float).
template <typename T>
bool router_rows_vec(const T* ptr, int64_t stride, int64_t H) {
  return H % 8 == 0 && rows_aligned(ptr, {stride});
}

// logits[t, e] = sum_h x[t, h] W[e, h] for the kRouterFwdBlockRows rows of block x and the kRouterExperts experts
// of group blockIdx.y (experts past E: zero weights, not stored). Per kRouterCols-column step the block stages the
// group's W columns in shared memory (fp32); each warp multiplies its kRouterFwdRows rows by them, a lane its 8
// columns, into 4 x 8 fp32 partials; at the end one xor butterfly per partial sums the lanes, and lane
// 8 r + e (32 lanes, 32 values) stores logit (r, e). VEC: the rows of x and W (router_rows_vec).
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(kBlock)
router_logits_fwd_kernel(const scalar_t* __restrict__ x, int64_t stride_x, int64_t T, int64_t H,
                         const float* __restrict__ W, int64_t stride_w, int64_t E, float* __restrict__ logits) {
  __shared__ float w_step[kRouterExperts][kRouterCols];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * kRouterExperts;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRouterFwdBlockRows + warp * kRouterFwdRows;
  float acc[kRouterFwdRows][kRouterExperts] = {};
#pragma unroll 1
  for (int64_t h0 = 0; h0 < H; h0 += kRouterCols) {
    __syncthreads();  // the previous step's reads of w_step are done
    // Warp w stages expert e0 + w's row (zeros past E), a lane its 8 columns.
    const int64_t c0 = h0 + 8 * lane;
    float wv[8];
    load8_float<float, VEC>(W + (e0 + warp) * stride_w, c0, e0 + warp < E ? H - c0 : 0, wv);
    *reinterpret_cast<float4*>(&w_step[warp][8 * lane]) = float4{wv[0], wv[1], wv[2], wv[3]};
    *reinterpret_cast<float4*>(&w_step[warp][8 * lane + 4]) = float4{wv[4], wv[5], wv[6], wv[7]};
    __syncthreads();
    float xv[kRouterFwdRows][8];
#pragma unroll
    for (int r = 0; r < kRouterFwdRows; ++r) {
      load8_float<scalar_t, VEC>(x + (t0 + r) * stride_x, c0, t0 + r < T ? H - c0 : 0, xv[r]);
    }
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      const float4 wa = *reinterpret_cast<const float4*>(&w_step[e][8 * lane]);
      const float4 wb = *reinterpret_cast<const float4*>(&w_step[e][8 * lane + 4]);
      const float w[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
      for (int r = 0; r < kRouterFwdRows; ++r) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          acc[r][e] = fmaf(xv[r][j], w[j], acc[r][e]);
        }
      }
    }
  }
  float mine = 0.0f;
#pragma unroll
  for (int r = 0; r < kRouterFwdRows; ++r) {
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      float v = acc[r][e];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
      }
      mine = lane == r * kRouterExperts + e ? v : mine;
    }
  }
  const int64_t t = t0 + lane / kRouterExperts;
  const int64_t e = e0 + lane % kRouterExperts;
  if (t < T && e < E) {
    logits[t * E + e] = mine;
  }
}

// dx[t, h] = sum_e g[t, e] W[e, h] for the 8 columns of each lane of the kRouterCols columns of block x and the
// kRouterDxRows rows of block y (warp w: rows w, w + 8, ...). The first kRouterExperts experts' W values stay in
// registers for the block; further experts (E > 8) are read per row. VEC: the rows of dx (router_rows_vec).
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(kBlock)
router_logits_dx_kernel(const float* __restrict__ g, int64_t T, int64_t H, const float* __restrict__ W,
                        int64_t stride_w, int64_t E, scalar_t* __restrict__ dx) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kRouterCols + 8 * lane;
  const int64_t n = H - c0;
  float w[kRouterExperts][8];
#pragma unroll
  for (int e = 0; e < kRouterExperts; ++e) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      w[e][j] = e < E && j < n ? W[e * stride_w + c0 + j] : 0.0f;
    }
  }
  const int64_t t_first = static_cast<int64_t>(blockIdx.y) * kRouterDxRows;
  const int64_t t_end = T < t_first + kRouterDxRows ? T : t_first + kRouterDxRows;
#pragma unroll 1
  for (int64_t t = t_first + warp; t < t_end; t += kWarps) {
    float v[8] = {};
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      if (e < E) {
        const float ge = g[t * E + e];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          v[j] = fmaf(ge, w[e][j], v[j]);
        }
      }
    }
#pragma unroll 1
    for (int64_t e = kRouterExperts; e < E; ++e) {
      const float ge = g[t * E + e];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[j] = j < n ? fmaf(ge, W[e * stride_w + c0 + j], v[j]) : v[j];
      }
    }
    if (n > 0) {
      store8<scalar_t, VEC>(dx + t * H, c0, n, v);
    }
  }
}

// part[c, e, h] = sum_{t in chunk c} g[t, e] x[t, h] (fp32) for chunk c = blockIdx.y of kRouterChunkT rows, the
// kRouterCols columns of block x and the experts of group blockIdx.z. Warp w sums the chunk's rows w, w + 8, ...
// into 8 x 8 partials per lane; the 8 warps' partials are added in a fixed tree through shared memory
// ((w0 + w4) + (w2 + w6)) + ((w1 + w5) + (w3 + w7)), so the result depends on T alone. VEC: the rows of x and of
// the partials (router_rows_vec).
template <typename scalar_t, bool VEC>
__global__ void __launch_bounds__(kBlock)
router_logits_dw_partial_kernel(const float* __restrict__ g, const scalar_t* __restrict__ x, int64_t stride_x,
                                int64_t T, int64_t H, int64_t E, float* __restrict__ part) {
  __shared__ float4 red[kWarps / 2][kRouterExperts * 2][32];  // 32 KB: the upper half's partials
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kRouterCols + 8 * lane;
  const int64_t n = H - c0;
  const int64_t e0 = static_cast<int64_t>(blockIdx.z) * kRouterExperts;
  const int64_t chunk = blockIdx.y;
  const int64_t t_end = T < (chunk + 1) * kRouterChunkT ? T : (chunk + 1) * kRouterChunkT;
  float acc[kRouterExperts][8] = {};
#pragma unroll 1
  for (int64_t t = chunk * kRouterChunkT + warp; t < t_end; t += kWarps) {
    float xv[8];
    load8_float<scalar_t, VEC>(x + t * stride_x, c0, n, xv);
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      const float ge = e0 + e < E ? g[t * E + e0 + e] : 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc[e][j] = fmaf(ge, xv[j], acc[e][j]);
      }
    }
  }
#pragma unroll 1
  for (int half = kWarps / 2; half > 0; half >>= 1) {
    if (warp >= half && warp < 2 * half) {
#pragma unroll
      for (int e = 0; e < kRouterExperts; ++e) {
        red[warp - half][2 * e][lane] = float4{acc[e][0], acc[e][1], acc[e][2], acc[e][3]};
        red[warp - half][2 * e + 1][lane] = float4{acc[e][4], acc[e][5], acc[e][6], acc[e][7]};
      }
    }
    __syncthreads();
    if (warp < half) {
#pragma unroll
      for (int e = 0; e < kRouterExperts; ++e) {
        const float4 a = red[warp][2 * e][lane];
        const float4 b = red[warp][2 * e + 1][lane];
        acc[e][0] += a.x, acc[e][1] += a.y, acc[e][2] += a.z, acc[e][3] += a.w;
        acc[e][4] += b.x, acc[e][5] += b.y, acc[e][6] += b.z, acc[e][7] += b.w;
      }
    }
    __syncthreads();
  }
  if (warp == 0 && n > 0) {
#pragma unroll
    for (int e = 0; e < kRouterExperts; ++e) {
      if (e0 + e < E) {
        store8<float, VEC>(part + (chunk * E + e0 + e) * H, c0, n, acc[e]);
      }
    }
  }
}

// dW.flat[i] = sum_c part[c].flat[i] over the n_chunks chunks in order c = 0, 1, ... (0 when there are none).
__global__ void __launch_bounds__(kBlock)
router_logits_dw_sum_kernel(const float* __restrict__ part, int64_t n_chunks, int64_t N, float* __restrict__ dw) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (i >= N) {
    return;
  }
  float s = 0.0f;
#pragma unroll 1
  for (int64_t c = 0; c < n_chunks; ++c) {
    s += part[c * N + i];
  }
  dw[i] = s;
}

}  // namespace
}  // namespace mixlora
