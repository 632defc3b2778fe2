// Tensor-core helpers shared by the kernels of csrc/ (nvcuda::wmma bf16 16x16x16 tiles, fp32 accumulators): the
// fragment types, 128-byte aligned offsets into the dynamic shared memory, and the exact split of an fp32 / fp16
// operand into bf16 terms. Free of torch, so that tests/cuda_cpu can compile it for the CPU (its mma.h emulates
// the wmma calls used here).
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <mma.h>

namespace mixlora {

namespace wmma = nvcuda::wmma;

using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using BRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using BCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using CFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__host__ __device__ constexpr int round16(int v) {
  return (v + 15) / 16 * 16;
}

template <typename T>
__device__ __forceinline__ T* smem_at(unsigned char* base, int offset) {
  return reinterpret_cast<T*>(base + offset);
}

// How many bf16 terms represent a value of type T exactly (as their fp32 sum): bf16 1, fp16 2 (11 significant
// bits), fp32 3 (24 bits; each round-to-nearest term takes at least the next 8). A product of a bf16 weight with
// such a split operand is then exact on the tensor cores, and only the fp32 accumulation rounds, as on FMA units.
template <typename T>
struct Bf16Terms {
  static constexpr int value = 3;
};
template <>
struct Bf16Terms<c10::Half> {
  static constexpr int value = 2;
};
template <>
struct Bf16Terms<c10::BFloat16> {
  static constexpr int value = 1;
};

// Writes v as N bf16 terms, term i at dst[i * plane] (hi first).
template <int N>
__device__ __forceinline__ void store_bf16_terms(float v, __nv_bfloat16* dst, int plane) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const __nv_bfloat16 t = __float2bfloat16_rn(v);
    dst[i * plane] = t;
    v -= __bfloat162float(t);
  }
}

// An fp32 accumulator tile of split-operand products in two parts: `hi` sums the products of the leading terms,
// `lo` the others (2^-8 of them and less), so that their additions round at lo's magnitude and the result is as
// accurate as an fp32 FMA chain over the unsplit operands. total() adds lo into hi (elementwise: same fragment type).
struct SplitAcc {
  CFrag hi, lo;
  __device__ __forceinline__ void zero() {
    wmma::fill_fragment(hi, 0.0f);
    wmma::fill_fragment(lo, 0.0f);
  }
  __device__ __forceinline__ CFrag& total() {
    for (int i = 0; i < hi.num_elements; ++i) {
      hi.x[i] += lo.x[i];
    }
    return hi;
  }
};

// acc += A B over `steps` 16-deep k steps, A and B held as NA / NB bf16 term planes (`plane` elements apart, leading
// dimension ld): a / b point at the fragment's first element, ak / bk are the offsets of one k step. The term pairs
// (i, j) with i + j < 3 are multiplied; the others are below 2^-24 of the product (fp32's rounding).
template <int NA, int NB, typename LA, typename LB>
__device__ __forceinline__ void mma_terms(SplitAcc& acc, const __nv_bfloat16* a, int ak, const __nv_bfloat16* b,
                                          int bk, int plane, int ld, int steps) {
  for (int s = 0; s < steps; ++s) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> fb[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      wmma::load_matrix_sync(fb[j], b + j * plane + s * bk, ld);
    }
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> fa;
      wmma::load_matrix_sync(fa, a + i * plane + s * ak, ld);
#pragma unroll
      for (int j = 0; j < NB && i + j < 3; ++j) {
        if (i + j == 0) {
          wmma::mma_sync(acc.hi, fa, fb[j], acc.hi);
        } else {
          wmma::mma_sync(acc.lo, fa, fb[j], acc.lo);
        }
      }
    }
  }
}

}  // namespace mixlora
