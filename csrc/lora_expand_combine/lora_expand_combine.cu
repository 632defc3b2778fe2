// Down-projection LoRA expand, combined per token (docs: mixlora.md §2-3), and its backward. Semantics:
// mixlora_kernels/ops/lora_expand_combine.py.
//
// Forward, y_t = s sum_k w_j B_e zd_j (fp32 out):
//   lora_expand_combine_fwd_kernel: token-major, one block per token, one thread per output column h (strided).
//   The token's K rank-R vectors zd_j sit in shared memory; B_e rows (R contiguous floats per h) come from L2.
//   The K slots are summed in order k = 0..K-1 inside one thread: no atomics, no (S, H) intermediate.
// Backward, with q_j = s B_e^T dy_t (rank R):
//   lora_expand_combine_bwd_q_kernel: one block per token; dy_t is read once per slot (the second slot's reads
//   hit L1/L2); each of the R outputs of q_j is a block reduction over H (deterministic: fixed-order butterfly +
//   fixed warp order, see common.cuh), computed 32 ranks per pass. Then dzd_j = w_j q_j and
//   dw_j = <q_j, zd_j> (one thread, r in order).
//   lora_expand_combine_bwd_dB_kernel: dB_e = s sum_{j -> e} (w_j dy_t) zd_j^T, a segmented reduction: one block
//   per (64 columns h, expert e, 64 ranks) walks its expert's slots in sorted order (same scheme as lora_shrink's
//   dA, same tuning note on a dominant expert).
// Expert ids read from `experts` are checked by device assertions (see csrc/lora_shrink/lora_shrink.cu).

#include "lora_expand_combine/lora_expand_combine.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kChunkSlots = 16;
constexpr int kRanksPerPass = 32;  // q: ranks reduced per pass over dy_t (32 fp32 partial sums per thread)

__global__ void __launch_bounds__(kBlock)
lora_expand_combine_fwd_kernel(const float* __restrict__ zd, int64_t zd_stride, const float* __restrict__ B,
                               int64_t B_stride0, int64_t B_stride1, const float* __restrict__ weights,
                               const int64_t* __restrict__ experts, int64_t num_experts, int64_t K, int64_t H,
                               int64_t R, float scale, float* __restrict__ y) {
  extern __shared__ float z_rows[];  // K x R
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
      const float* B_row = B + e * B_stride0 + h * B_stride1;
      float s = 0.0f;
      for (int64_t r = 0; r < R; ++r) {
        s = fmaf(B_row[r], z_rows[k * R + r], s);
      }
      acc += s * weights[t * K + k];
    }
    y[t * H + h] = scale * acc;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
lora_expand_combine_bwd_q_kernel(const scalar_t* __restrict__ grad_y, int64_t gy_stride,
                                 const float* __restrict__ zd, int64_t zd_stride, const float* __restrict__ B,
                                 int64_t B_stride0, int64_t B_stride1, const float* __restrict__ weights,
                                 const int64_t* __restrict__ experts, int64_t num_experts, int64_t K, int64_t H,
                                 int64_t R, float scale, float* __restrict__ dzd, float* __restrict__ dweights) {
  extern __shared__ float q[];  // R
  __shared__ float red[kWarps * kRanksPerPass];
  __shared__ float sums[kRanksPerPass];
  const int64_t t = blockIdx.x;
  const scalar_t* dy = grad_y + t * gy_stride;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t j = t * K + k;
    const int64_t e = experts[j];
    CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "lora_expand_combine_backward: expert id out of range [0, E)");
    const float* B_e = B + e * B_stride0;
    for (int64_t r0 = 0; r0 < R; r0 += kRanksPerPass) {
      float part[kRanksPerPass] = {};
      for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        const float d = static_cast<float>(dy[h]);
        const float* B_row = B_e + h * B_stride1 + r0;
#pragma unroll
        for (int c = 0; c < kRanksPerPass; ++c) {
          if (r0 + c < R) {
            part[c] = fmaf(B_row[c], d, part[c]);
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

unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace

void lora_expand_combine_forward_launch(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                        const at::Tensor& experts, double scale, at::Tensor& y,
                                        cudaStream_t stream) {
  const int64_t T = y.size(0);
  const int64_t H = y.size(1);
  const int64_t K = experts.size(1);
  const int64_t R = B.size(2);
  if (T == 0 || H == 0) {
    return;
  }
  const size_t smem = static_cast<size_t>(K * R) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "lora_expand_combine: K * R = ", K * R, " floats of zd per token exceed the ",
              "48 KiB of shared memory this kernel version stages them in; use the torch or triton backend");
  lora_expand_combine_fwd_kernel<<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
      zd.const_data_ptr<float>(), zd.stride(0), B.const_data_ptr<float>(), B.stride(0), B.stride(1),
      weights.const_data_ptr<float>(), experts.const_data_ptr<int64_t>(), B.size(0), K, H, R,
      static_cast<float>(scale), y.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lora_expand_combine_backward_launch(const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B,
                                         const at::Tensor& weights, const at::Tensor& experts,
                                         const at::Tensor& order, const at::Tensor& offsets, double scale,
                                         at::Tensor& dzd, at::Tensor& dB, at::Tensor& dweights,
                                         cudaStream_t stream) {
  const int64_t T = grad_y.size(0);
  const int64_t H = grad_y.size(1);
  const int64_t K = experts.size(1);
  const int64_t E = B.size(0);
  const int64_t R = B.size(2);
  if (T > 0) {
    const size_t smem = static_cast<size_t>(R) * sizeof(float);
    TORCH_CHECK(smem + (kWarps + 1) * kRanksPerPass * sizeof(float) <= 48 * 1024, "lora_expand_combine_backward: ",
                "rank R = ", R, " exceeds what this kernel version keeps in shared memory");
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_y.scalar_type(), "lora_expand_combine_backward", [&] {
      lora_expand_combine_bwd_q_kernel<scalar_t><<<static_cast<unsigned int>(T), kBlock, smem, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), zd.const_data_ptr<float>(), zd.stride(0),
          B.const_data_ptr<float>(), B.stride(0), B.stride(1), weights.const_data_ptr<float>(),
          experts.const_data_ptr<int64_t>(), E, K, H, R, static_cast<float>(scale), dzd.mutable_data_ptr<float>(),
          dweights.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (E > 0 && H > 0 && R > 0) {
    const dim3 grid(ceil_div(H, kTileM), static_cast<unsigned int>(E), ceil_div(R, kTileN));
    MIXLORA_DISPATCH_FLOAT_HALF_BF16(grad_y.scalar_type(), "lora_expand_combine_backward", [&] {
      lora_expand_combine_bwd_dB_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), zd.const_data_ptr<float>(), zd.stride(0),
          weights.const_data_ptr<float>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
          T * K, K, H, R, static_cast<float>(scale), dB.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace mixlora
