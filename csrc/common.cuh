// Device helpers shared by the kernels of csrc/ (lora_shrink, lora_expand_combine, expand_act_combine, route,
// router_logits): the block shape, the counter-based dropout mask, activations, a deterministic block reduction,
// the mapping of a block to a tile of one expert's segment, the register-tile FMA loop of the SIMT weight
// gradients, the dynamic shared memory, and the host's test for 16-byte aligned rows. Free of torch (the dtype
// dispatch of the launch code is in dispatch.h), so that tests/cuda_cpu can compile the kernels for the CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include <c10/macros/Macros.h>

namespace mixlora {

// Every kernel of these files runs 256 threads (8 warps) per block: enough warps to hide the L2 latency of the
// rank-R weight reads in the bandwidth-bound token-major kernels; the tile shapes below assume it.
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

// Register tile of the SIMT weight-gradient kernel (expand_act_combine's eac_bwd_weight_kernel, the fallback of
// fp32 / fp16 models): a block owns kTileM = 64 columns i x kTileN = 64 rank columns; thread tid owns row
// m = tid % 64 and the 16 columns (tid / 64) + 4q. Shared tiles are stored k-major with a leading dimension of 65
// (one pad word) so that both the transposing stores and the row reads are free of bank conflicts. (The lora
// kernels and the bf16 expand_act_combine path run their products on tensor cores: lora_tiles.cuh,
// tensor_core.cuh.)
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kLd = kTileM + 1;
constexpr int kPerThread = kTileN * kTileM / kBlock;  // 16
constexpr int kColGroups = kBlock / kTileM;           // 4

// LoRA dropout, identical to mixlora_kernels/ops/_common.py::dropout_scale: element (slot j, column c) of an
// (S, cols) slot matrix is kept iff hash32(uint32(j * cols + c) ^ uint32(seed)) >= floor(p * 2^32), and kept
// elements are scaled by 1 / (1 - p). Unsigned 32-bit arithmetic wraps, i.e. computes j * cols + c mod 2^32.
struct Dropout {
  uint32_t seed;
  uint32_t threshold;
  float scale;
  bool active;
};

// Host side: the mask parameters for dropout probability p in [0, 1) (checked by the caller) and a 64-bit seed.
// threshold = floor(p * 2^32) as Python's int(p * 2**32); scale = 1 / (1 - p) rounded as torch rounds
// `keep.float() / (1.0 - p)` (the scalar is converted to fp32 first).
inline Dropout make_dropout(double p, int64_t seed) {
  Dropout d;
  d.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  d.threshold = static_cast<uint32_t>(p * 4294967296.0);
  d.scale = 1.0f / static_cast<float>(1.0 - p);
  d.active = p > 0.0;
  return d;
}

__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  return (x >> 16) ^ x;
}

// Whether element (slot, c) of the mask is kept (always, when dropout is off).
__device__ __forceinline__ bool dropout_keep(const Dropout& d, int64_t slot, int64_t cols, int64_t c) {
  const uint32_t idx = static_cast<uint32_t>(slot) * static_cast<uint32_t>(cols) + static_cast<uint32_t>(c);
  return !d.active || hash32(idx ^ d.seed) >= d.threshold;
}

// d with `active` the compile-time DROP of a kernel instantiation, so that dropout_keep / dropout_mult fold to
// their dropout-off value (no hash) in the instances compiled without dropout.
template <bool DROP>
__device__ __forceinline__ Dropout static_dropout(Dropout d) {
  d.active = DROP;
  return d;
}

// The mask element's multiplier: 1 / (1 - p) kept, 0 dropped, 1 without dropout.
__device__ __forceinline__ float dropout_mult(const Dropout& d, int64_t slot, int64_t cols, int64_t c) {
  if (!d.active) {
    return 1.0f;
  }
  return dropout_keep(d, slot, cols, c) ? d.scale : 0.0f;
}

// Activation codes, in the order of ops/_common.py::ACTIVATIONS.
enum Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

// e^x on the special-function unit, flushing denormals: ex2.approx.ftz.f32 of x log2(e), FMUL + MUFU.EX2 (relative
// error ~2^-22), where __expf adds a range test and two scalings for denormal results. The CPU harness computes it
// exactly, as its __expf.
__device__ __forceinline__ float fast_exp(float x) {
#ifdef MIXLORA_CUDA_CPU
  return std::exp(x);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
#endif
}

__device__ __forceinline__ float act_forward(int act, float g) {
  switch (act) {
    case kSilu:
      return __fdividef(g, 1.0f + fast_exp(-g));  // ex2.approx and rcp.approx: 2 + 2 instructions
    case kGelu:
      return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.79788456080286536f * (g + 0.044715f * g * g * g);
      return 0.5f * g * (1.0f + tanhf(inner));
    }
    default:
      return g > 0.0f ? g : 0.0f;
  }
}

// act(g) and d act(g) / dg (the formulas of ops/_common.py::activation_grad) from one evaluation of the special
// functions: the backward needs both at each element (SiLU: one exp and one reciprocal, act = g sigmoid(g)).
__device__ __forceinline__ void act_forward_grad(int act, float g, float& a, float& da) {
  switch (act) {
    case kSilu: {
      const float sig = __fdividef(1.0f, 1.0f + fast_exp(-g));
      a = g * sig;
      da = sig * (1.0f + g * (1.0f - sig));
      return;
    }
    case kGelu: {
      const float cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752f));
      a = g * cdf;
      da = cdf + g * expf(-0.5f * g * g) * 0.39894228040143268f;
      return;
    }
    case kGeluTanh: {
      const float c = 0.79788456080286536f;
      const float th = tanhf(c * (g + 0.044715f * g * g * g));
      a = 0.5f * g * (1.0f + th);
      da = 0.5f * (1.0f + th) + 0.5f * g * (1.0f - th * th) * c * (1.0f + 3.0f * 0.044715f * g * g);
      return;
    }
    default:
      a = g > 0.0f ? g : 0.0f;
      da = g > 0.0f ? 1.0f : 0.0f;
  }
}

// d act(g) / dg.
__device__ __forceinline__ float act_grad(int act, float g) {
  float a, da;
  act_forward_grad(act, g, a, da);
  return da;
}

// Sums v[0..N) over the block in a fixed order (xor butterfly inside each warp, then warps 0..7 in order by one
// thread per value), so the result is bit-identical run to run. `red` is shared scratch of kWarps * N floats,
// the result lands in shared `out[0..N)`, visible to all threads on return. Every thread of the block must call.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* red, float* out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[n] += __shfl_xor_sync(0xffffffffu, v[n], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      red[warp * N + n] = v[n];
    }
  }
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      s += red[w * N + n];
    }
    out[n] = s;
  }
  __syncthreads();
}

// Block b of a grid that tiles every expert's segment [offsets[e], offsets[e+1]) of the expert-sorted order into
// tiles of `tile` positions separately (so no tile mixes experts). The grid is sized on the host without reading
// offsets: sum_e ceil(n_e / tile) <= ceil(S / tile) + E blocks; surplus blocks get false and exit. O(E) per block,
// offsets stay in L1/L2.
__device__ __forceinline__ bool find_segment_tile(const int64_t* __restrict__ offsets, int64_t num_experts,
                                                  int64_t b, int64_t tile, int64_t& expert, int64_t& start,
                                                  int64_t& end) {
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t lo = offsets[e];
    const int64_t hi = offsets[e + 1];
    const int64_t tiles = (hi - lo + tile - 1) / tile;
    if (b < tiles) {
      expert = e;
      start = lo + b * tile;
      end = start + tile < hi ? start + tile : hi;
      return true;
    }
    b -= tiles;
  }
  return false;
}

// acc[q] += sum_{k < nk} P[k][m] * Q[k][cg + 4q] for the columns cg + 4q < ncols. P is k-major with leading
// dimension kLd (row m = this thread's), Q k-major with leading dimension ldq; the Q reads are warp broadcasts
// (a warp shares cg), the P reads are consecutive.
__device__ __forceinline__ void tile_fma(const float* P, const float* Q, int ldq, int m, int cg, int ncols,
                                         int nk, float (&acc)[kPerThread]) {
  for (int k = 0; k < nk; ++k) {
    const float p = P[k * kLd + m];
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int c = cg + kColGroups * q;
      if (c < ncols) {
        acc[q] = fmaf(p, Q[k * ldq + c], acc[q]);
      }
    }
  }
}

// Host side: whether rows of T starting at ptr, `strides` elements apart, all start on 16 bytes (16-byte loads: 8
// 16-bit or 4 fp32 elements).
template <typename T>
bool rows_aligned(const T* ptr, std::initializer_list<int64_t> strides) {
  bool ok = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  for (int64_t s : strides) {
    ok = ok && (s * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  }
  return ok;
}

// The launch's dynamic shared memory (its `smem` bytes) as T*. One `extern __shared__` declaration for every
// kernel (float4: 16-byte aligned for any T), which the CPU harness (tests/cuda_cpu/cuda_cpu.h) supplies.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ float4 mixlora_dynamic_smem[];
  return reinterpret_cast<T*>(mixlora_dynamic_smem);
}

}  // namespace mixlora
