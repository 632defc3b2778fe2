// Grouped LoRA shrink (docs: mixlora.md §2-3) and its backward. Semantics: mixlora_kernels/ops/lora_shrink.py.
//
// Forward, z_j = A_e drop_j(x_t) for slot j = t*K + k routed to expert e:
//   lora_shrink_fwd_kernel: a grouped GEMM over the expert-sorted slot order. Block = (64 consecutive positions
//   of one expert's segment, 64 rank columns); it loops over H in chunks of 32, gathering the 64 token rows of x
//   straight into shared memory (the gather and the dropout mask are fused into the load: no (S, H) copy),
//   and the 64 x 32 slice of A_e next to it. Each thread accumulates 16 outputs in fp32 registers.
//   grid = (ceil(S/64) + E, ceil(R/64)): an upper bound on the per-expert tile count, so nothing is read on the
//   host; surplus blocks exit.
// Backward:
//   lora_shrink_bwd_dx_kernel: token-major, one block per token: dx_t = sum_k drop_j(A_e^T dz_j), the K slots of
//   the token summed inside one thread (k = 0..K-1 in order), no atomics. dz_j (K x R) is staged in shared
//   memory; A_e is read from L2 (E*R*H*4 bytes, a few MB).
//   lora_shrink_bwd_dA_kernel: dA_e = sum_{j -> e} dz_j drop_j(x_t)^T, a segmented reduction: one block per
//   (64 columns h, expert e, 64 ranks) walks its expert's slots in sorted order in chunks of 16. Deterministic
//   (fixed order, no atomics). Tuning note: when one expert holds most slots only ceil(H/64) blocks work on it;
//   a split over the slots with a second fixed-order pass is the next step if that shows up in profiles.
// Expert ids: the forward takes the expert of a slot from `offsets` (as the reference does); the dx kernel reads
// `experts` and checks each id with a device assertion (CUDA_KERNEL_ASSERT: reported at the next synchronising
// call as "device-side assert triggered"; the CUDA context is unusable afterwards). Slot ids read from `order`
// are checked the same way.

#include "lora_shrink/lora_shrink.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kChunkH = 32;     // forward: H chunk per shared tile (64 rows x 32 = 8 loads per thread)
constexpr int kChunkSlots = 16;  // dA: slots per shared tile (16 x 64 = 4 loads per thread)

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
lora_shrink_fwd_kernel(const scalar_t* __restrict__ x, int64_t x_stride, const float* __restrict__ A,
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
  const float* A_e = A + expert * A_stride0;
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
      Q[kk * kLd + n] = (n < ncols && h < H) ? A_e[(rank0 + n) * A_stride1 + h] : 0.0f;
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
lora_shrink_bwd_dx_kernel(const float* __restrict__ grad_z, int64_t gz_stride, const float* __restrict__ A,
                          int64_t A_stride0, int64_t A_stride1, const int64_t* __restrict__ experts,
                          int64_t num_experts, int64_t K, int64_t H, int64_t R, Dropout drop,
                          scalar_t* __restrict__ dx) {
  extern __shared__ float dz[];  // K x R rows of this token's slots
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
      const float* A_e = A + e * A_stride0 + h;
      float s = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        s = fmaf(A_e[r * A_stride1], dz[k * R + r], s);
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

unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace

void lora_shrink_forward_launch(const at::Tensor& x, const at::Tensor& A, const at::Tensor& order,
                                const at::Tensor& offsets, int64_t K, double dropout_p, int64_t seed, at::Tensor& z,
                                cudaStream_t stream) {
  const int64_t S = z.size(0);
  const int64_t R = z.size(1);
  const int64_t H = x.size(1);
  const int64_t E = A.size(0);
  if (S == 0 || R == 0 || H == 0) {  // H = 0: the caller allocated z as zeros
    return;
  }
  const dim3 grid(ceil_div(S, kTileM) + static_cast<unsigned int>(E), ceil_div(R, kTileN));
  const Dropout drop = make_dropout(dropout_p, seed);
  MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink", [&] {
    lora_shrink_fwd_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), A.const_data_ptr<float>(), A.stride(0), A.stride(1),
        order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), E, S, K, H, R, drop,
        z.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lora_shrink_backward_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& A,
                                 const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                 double dropout_p, int64_t seed, at::Tensor& dx, at::Tensor& dA,
                                 cudaStream_t stream) {
  const int64_t T = x.size(0);
  const int64_t H = x.size(1);
  const int64_t E = A.size(0);
  const int64_t R = A.size(1);
  const int64_t K = experts.size(1);
  const int64_t S = T * K;
  const Dropout drop = make_dropout(dropout_p, seed);
  if (T > 0 && H > 0) {
    const size_t smem = static_cast<size_t>(K * R) * sizeof(float);
    TORCH_CHECK(smem <= 48 * 1024, "lora_shrink_backward: K * R = ", K * R, " floats of grad_z per token exceed the ",
                "48 KiB of shared memory this kernel version stages them in; use the torch or triton backend");
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink_backward", [&] {
      lora_shrink_bwd_dx_kernel<scalar_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
          grad_z.const_data_ptr<float>(), grad_z.stride(0), A.const_data_ptr<float>(), A.stride(0), A.stride(1),
          experts.const_data_ptr<int64_t>(), E, K, H, R, drop, dx.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (E > 0 && R > 0 && H > 0) {
    // Every block writes its tile, zeros included, so empty experts get dA_e = 0 without a memset.
    const dim3 grid(ceil_div(H, kTileM), static_cast<unsigned int>(E), ceil_div(R, kTileN));
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "lora_shrink_backward", [&] {
      lora_shrink_bwd_dA_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          grad_z.const_data_ptr<float>(), grad_z.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
          order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), S, K, H, R, drop,
          dA.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace mixlora
