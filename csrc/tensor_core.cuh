// Tensor-core helpers shared by the kernels of csrc/ (mma.sync m16n8k16 bf16 register tiles fed by ldmatrix, fp32
// accumulators): 128-byte aligned offsets into the dynamic shared memory, the exact split of an fp32 / fp16 operand
// into bf16 terms and its rounding to a product's precision, and the tile products. Free of torch, so that
// tests/cuda_cpu can compile it for the CPU (its mma_sync.h emulates the two instructions).
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#ifdef MIXLORA_CUDA_CPU
#include "mma_sync.h"
#endif

namespace mixlora {

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

// The bf16 terms of a T operand of products in precision dot_t (a 16-bit dtype, or float: exact): those of the coarser
// of the two, so that a finer operand, the fp32 rank vectors of a 16-bit model, is multiplied rounded to dot_t (to_dot)
// as the Triton kernels and a plain 16-bit LoRA multiply it.
template <typename T, typename dot_t>
constexpr int kTerms = Bf16Terms<T>::value < Bf16Terms<dot_t>::value ? Bf16Terms<T>::value : Bf16Terms<dot_t>::value;

// v rounded (to nearest even) to dot_t; unchanged for float.
template <typename dot_t>
__host__ __device__ __forceinline__ float to_dot(float v) {
  if constexpr (std::is_same_v<dot_t, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<dot_t>(v));
  }
}

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

// Register tiles of mma.sync m16n8k16 (bf16 x bf16 -> fp32) with the PTX ISA's element layouts, g = lane / 4,
// t = lane % 4, two bf16 per 32-bit word (the first element in the low half):
//   A 16 x 16: a[0] = (row g, cols 2t, 2t+1), a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..)
//   B 16 x 8:  b[0] = (k 2t, 2t+1; n g), b[1] = (k 2t + 8.., n g)
//   C 16 x 8:  c[0..1] = (row g, cols 2t, 2t+1), c[2..3] = (g + 8, 2t..)
// so a C tile pair (n 0-7, 8-15) rounded to bf16 is the A tile of the next product over those 16 columns. The CPU
// harness (tests/cuda_cpu/mma_sync.h) emulates both instructions with these layouts.
// d += A B.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef MIXLORA_CUDA_CPU
  cuda_cpu_tc::mma_16816(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ldmatrix .x4: r[m] = this lane's pair of the 8 x 8 bf16 matrix m (m = 0..3) in shared memory whose row i lane
// 8 m + i addresses (16-byte aligned): (row lane / 4, columns 2t, 2t+1); TRANS: (rows 2t, 2t+1, column lane / 4).
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#ifdef MIXLORA_CUDA_CPU
  cuda_cpu_tc::ldsm_x4(r, row, TRANS);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#endif
}

// Two B tiles (n nb..nb+7 and nb+8..nb+15, k kb..kb+15) from a bf16 shared array of leading dimension ld (a multiple
// of 8) holding element (k, n) at s[n * ld + k], or with K_MAJOR at s[k * ld + n] (ldmatrix .trans).
template <bool K_MAJOR>
__device__ __forceinline__ void load_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], const __nv_bfloat16* s, int ld,
                                            int kb, int nb) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int m = lane / 8, i = lane % 8;
  uint32_t r[4];
  if (K_MAJOR) {
    ldsm_x4<true>(r, s + (kb + (m % 2) * 8 + i) * ld + nb + (m / 2) * 8);
  } else {
    ldsm_x4<false>(r, s + (nb + (m / 2) * 8 + i) * ld + kb + (m % 2) * 8);
  }
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// The A tile (rows m 0..15, k kb..kb+15) of a bf16 shared array of leading dimension ld (a multiple of 8) holding
// element (m, k) at s[m * ld + k], or with K_MAJOR at s[k * ld + m] (ldmatrix .trans).
template <bool K_MAJOR>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* s, int ld, int kb) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int q = lane / 8, i = lane % 8;
  if (K_MAJOR) {
    ldsm_x4<true>(a, s + (kb + (q / 2) * 8 + i) * ld + (q % 2) * 8);
  } else {
    ldsm_x4<false>(a, s + ((q % 2) * 8 + i) * ld + kb + (q / 2) * 8);
  }
}

// A 16 x 16 fp32 accumulator tile of split-operand products (two 16 x 8 mma_16816 C tiles, columns 0-7 and 8-15) in
// two parts: `hi` sums the products of the leading terms, `lo` the others (2^-8 of them and less), so that their
// additions round at lo's magnitude and the result is as accurate as an fp32 FMA chain over the unsplit operands.
struct SplitAcc {
  float hi[2][4], lo[2][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        hi[h][q] = 0.0f;
        lo[h][q] = 0.0f;
      }
    }
  }
  // dst[r * ld + c] = element (r, c) of hi + lo: this lane's elements in the C layout above.
  __device__ __forceinline__ void store(float* dst, int ld) const {
    const int lane = static_cast<int>(threadIdx.x % 32);
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        dst[(g + q / 2 * 8) * ld + h * 8 + 2 * t + q % 2] = hi[h][q] + lo[h][q];
      }
    }
  }
};

// One operand of mma_terms: NA (or NB) bf16 term planes, `plane` elements apart, of leading dimension `ld`; `p`
// points at the tile's first element of plane 0 and `k_step` is the offset of one 16-deep k step. K_MAJOR (a
// template argument of mma_terms) as for load_a / load_b_pair: element (row, k) at p[k * ld + row].
struct TermPlanes {
  const __nv_bfloat16* p;
  int k_step, plane, ld;
};

// acc += A B over 16-deep k step s, A (16 x 16) and B (16 x 16) held as NA / NB bf16 term planes. The term pairs
// (i, j) with i + j < 3 are multiplied; the others are below 2^-24 of the product (fp32's rounding).
template <int NA, int NB, bool A_K_MAJOR, bool B_K_MAJOR>
__device__ __forceinline__ void mma_step(SplitAcc& acc, const TermPlanes& a, const TermPlanes& b, int s) {
  uint32_t fb[NB][2][2];
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    load_b_pair<B_K_MAJOR>(fb[j][0], fb[j][1], b.p + j * b.plane + s * b.k_step, b.ld, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < NA; ++i) {
    uint32_t fa[4];
    load_a<A_K_MAJOR>(fa, a.p + i * a.plane + s * a.k_step, a.ld, 0);
#pragma unroll
    for (int j = 0; j < NB && i + j < 3; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (i + j == 0) {
          mma_16816(acc.hi[h], fa, fb[j][h]);
        } else {
          mma_16816(acc.lo[h], fa, fb[j][h]);
        }
      }
    }
  }
}

// acc += A B over k steps [0, steps): a run-time count (at most 4 in the kernels: a rolled loop, no remainder
// copies), or STEPS when it is a compile-time one (fully unrolled).
template <int NA, int NB, bool A_K_MAJOR, bool B_K_MAJOR, int STEPS = 0>
__device__ __forceinline__ void mma_terms(SplitAcc& acc, TermPlanes a, TermPlanes b, int steps = STEPS) {
  if constexpr (STEPS > 0) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      mma_step<NA, NB, A_K_MAJOR, B_K_MAJOR>(acc, a, b, s);
    }
  } else {
#pragma unroll 1
    for (int s = 0; s < steps; ++s) {
      mma_step<NA, NB, A_K_MAJOR, B_K_MAJOR>(acc, a, b, s);
    }
  }
}

// lo, hi rounded to bf16 in one 32-bit word (lo in the low half).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return static_cast<uint32_t>(static_cast<c10::BFloat16>(lo).x) |
         static_cast<uint32_t>(static_cast<c10::BFloat16>(hi).x) << 16;
}

}  // namespace mixlora
