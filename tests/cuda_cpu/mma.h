// The part of CUDA's <mma.h> (nvcuda::wmma) the kernels use, for the CPU harness (found before the toolkit's
// header through -I tests/cuda_cpu): bf16 16x16x16 tiles with fp32 accumulators.
//
// A real fragment spreads its tile over the warp's 32 lanes in an unspecified layout, so kernels may only touch it
// through these functions, or elementwise through x[0..num_elements). Here every lane holds the whole tile, which that contract cannot tell apart. The calls
// are warp-collective: as documented, each waits until every lane of the warp has arrived (a __syncwarp, which also
// checks that all lanes make the call) and then acts. A store writes only this lane's share of the tile (a
// scrambled eighth), so a lane that reads a stored tile before the other lanes have stored their shares (a
// missing __syncwarp between store_matrix_sync and plain loads) reads the NaN poison or stale data.
#pragma once

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the CPU harness emulates 16x16x16 tiles only");
  // The whole tile, row-major, in every lane. Kernels may index x only elementwise over num_elements, pairing
  // elements of fragments of one type (the same, unspecified, element order), as the CUDA documentation allows.
  static constexpr int num_elements = 16 * 16;
  T x[16 * 16];
};

namespace detail {
inline void converge(const char* what) {
  (void)what;
  __syncwarp();
}
template <typename T>
void load(T* tile, const T* p, unsigned ldm, bool col) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      tile[r * 16 + c] = col ? p[c * ldm + r] : p[r * ldm + c];
    }
  }
}
}  // namespace detail

template <typename Use, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, L>& f, const __nv_bfloat16* p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a/b fragments need a layout");
  detail::converge("load_matrix_sync");
  detail::load(f.x, p, ldm, std::is_same_v<L, col_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::converge("load_matrix_sync");
  detail::load(f.x, p, ldm, layout == mem_col_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::converge("store_matrix_sync");
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int idx = 0; idx < 256; ++idx) {
    if ((idx * 7 + 3) % 32 == lane) {  // a share unlike any plain lane + 32 q or 8-per-lane access pattern
      const int r = idx / 16, c = idx % 16;
      (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[idx];
    }
  }
}

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, T value) {
  for (T& v : f.x) {
    v = value;
  }
}

// d = a b + c in fp32 (products of bf16 values are exact in fp32; the sum runs k = 0..15 in order).
template <typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) {
        s = std::fma(static_cast<float>(a.x[r * 16 + k]), static_cast<float>(b.x[k * 16 + n]), s);
      }
      out[r * 16 + n] = s;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
  detail::converge("mma_sync");
}

}  // namespace wmma
}  // namespace nvcuda
