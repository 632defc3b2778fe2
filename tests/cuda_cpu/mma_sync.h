// The register-tile instructions of csrc/tensor_core.cuh (mma_16816, ldsm_x4 and its .trans) for the CPU harness,
// which tensor_core.cuh includes under MIXLORA_CUDA_CPU, with the element layouts of the PTX ISA (mma.sync m16n8k16
// .bf16, ldmatrix .m8n8 .x4 .b16). Warp-collective: each lane posts its operands to the warp's slot of a
// block-shared exchange, a __syncwarp, each lane computes its own result from all lanes' posts, and a second
// __syncwarp keeps the slot until every lane has read it.
#pragma once

#include "cuda_bf16.h"

namespace cuda_cpu_tc {

struct Post {
  uint32_t a[4], b[2];
  const unsigned short* row;
};

inline Post* warp_posts() {
  __shared__ Post posts[32][32];  // [warp][lane]
  return posts[threadIdx.x / 32];
}

inline float bf16_lo(uint32_t w) {
  return static_cast<float>(c10::BFloat16(static_cast<uint16_t>(w & 0xffffu), c10::BFloat16::from_bits()));
}
inline float bf16_hi(uint32_t w) {
  return bf16_lo(w >> 16);
}

// d += A B: A 16 x 16 (a[0] = (g, 2t..2t+1), a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..)),
// B 16 x 8 (b[0] = (k 2t..2t+1, n g), b[1] = (k 2t + 8.., n g)), d 16 x 8 (d[0..1] = (g, 2t..2t+1), d[2..3] =
// (g + 8, 2t..)); g = lane / 4, t = lane % 4, the low half of a word the first element. fp32 products of bf16 are
// exact; the sum runs k = 0..15 in order onto d.
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Post* posts = warp_posts();
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int q = 0; q < 4; ++q) posts[lane].a[q] = a[q];
  posts[lane].b[0] = b[0];
  posts[lane].b[1] = b[1];
  __syncwarp();
  auto A = [&](int r, int k) {  // element (r, k) of A
    const Post& p = posts[(r % 8) * 4 + (k % 8) / 2];
    const uint32_t w = p.a[(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return k % 2 ? bf16_hi(w) : bf16_lo(w);
  };
  auto B = [&](int k, int n) {
    const Post& p = posts[n * 4 + (k % 8) / 2];
    const uint32_t w = p.b[k >= 8 ? 1 : 0];
    return k % 2 ? bf16_hi(w) : bf16_lo(w);
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int q = 0; q < 4; ++q) {
    const int r = g + (q >= 2 ? 8 : 0), n = 2 * t + q % 2;
    float s = d[q];
    for (int k = 0; k < 16; ++k) {
      s = std::fma(A(r, k), B(k, n), s);
    }
    out[q] = s;
  }
  __syncwarp();
  for (int q = 0; q < 4; ++q) d[q] = out[q];
}

// r[m] = this lane's pair of 8 x 8 matrix m (m = 0..3), whose row i lane 8 m + i addresses (16 aligned bytes):
// (row lane / 4, columns 2 (lane % 4) and + 1), or with `trans` (rows 2 (lane % 4) and + 1, column lane / 4).
inline void ldsm_x4(uint32_t (&r)[4], const void* row, bool trans) {
  Post* posts = warp_posts();
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    ::cuda_cpu::fault("ldmatrix: a row address is not 16-byte aligned");
  }
  posts[lane].row = static_cast<const unsigned short*>(row);
  __syncwarp();
  const int g = lane / 4, t = lane % 4;
  uint32_t out[4];
  for (int m = 0; m < 4; ++m) {
    const uint32_t lo = trans ? posts[8 * m + 2 * t].row[g] : posts[8 * m + g].row[2 * t];
    const uint32_t hi = trans ? posts[8 * m + 2 * t + 1].row[g] : posts[8 * m + g].row[2 * t + 1];
    out[m] = lo | hi << 16;
  }
  __syncwarp();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}

}  // namespace cuda_cpu_tc
