// Pieces shared by the C++ CPU kernels (mixlora_kernels._cpu): ISA multiversioning, the vectorisable fp32 math of
// the activations, the LoRA-dropout counter hash, bf16 loads, the column blocks and expert tiles of a call, and the
// rank-R GEMMs on the tiles (the BLAS behind torch's matmuls).
//
// Determinism: every reduction has a fixed order that depends on the shapes and the routing only, never on the
// number of threads or on scheduling. Work is split into column blocks of I (a function of I alone); one task owns a
// block, so per-token sums over a token's slots and per-expert weight gradients of its columns are accumulated by
// one thread in expert-sorted order; rank-R results (sums over I) are written per block and summed over the blocks
// in block order afterwards.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace mixlora_cpu {

// Elementwise loops are compiled for AVX-512, AVX2+FMA and the baseline and picked at load time (GCC function
// multiversioning through an ifunc resolver): one binary for any x86-64 CPU, without -march=native. Elsewhere the
// loops are compiled once, for the target the compiler was given.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(MIXLORA_CPU_NO_CLONES)
#define MIXLORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MIXLORA_CLONES
#endif
#define MIXLORA_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------------------------
// fp32 math without libm calls (libm's expf/erff/tanhf do not vectorise): branch-free, so the loops that use them
// vectorise in every clone. Measured against double precision on [-20, 20] in steps of 1e-5: exp ≤ 1.35 ulp
// (relative), erf ≤ 0.49 eps and tanh ≤ 0.63 eps absolute.

MIXLORA_INLINE float bits_to_float(uint32_t bits) { return __builtin_bit_cast(float, bits); }

// Cephes expf: x = n ln2 + r, |r| ≤ ln2/2, exp(r) by a degree-6 polynomial, 2^n from the exponent bits. Clamped to
// [-87.3, 88.3] (normal results; NaN passes through the ternaries and the polynomial).
MIXLORA_INLINE float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  return y * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// erf: an odd polynomial below |a| = 0.9277, 1 - exp(polynomial) above (N. Juffa's single-precision erff, both
// branches evaluated and one selected).
MIXLORA_INLINE float erf_f(float a) {
  const float t = a < 0.0f ? -a : a;
  const float s = a * a;
  float r = -1.72853470e-5f * t + 3.83197126e-4f;
  const float u = -3.88396438e-3f * t + 2.42546219e-2f;
  r = r * s + u;
  r = r * t - 1.06777877e-1f;
  r = r * t - 6.34846687e-1f;
  r = r * t - 1.28717512e-1f;
  r = r * t - t;
  float big = 1.0f - exp_f(r);
  big = t > 4.0f ? 1.0f : big;
  big = a < 0.0f ? -big : big;
  float q = -5.96761703e-4f;
  q = q * s + 4.99119423e-3f;
  q = q * s - 2.67681349e-2f;
  q = q * s + 1.12819925e-1f;
  q = q * s - 3.76125336e-1f;
  q = q * s + 1.28379166e-1f;
  q = q * a + a;
  return t > 0.927734375f ? big : q;
}

// tanh: Cephes' odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above.
MIXLORA_INLINE float tanh_f(float x) {
  const float ax = x < 0.0f ? -x : x;
  float big = 1.0f - 2.0f / (exp_f(2.0f * ax) + 1.0f);
  big = x < 0.0f ? -big : big;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  return ax < 0.625f ? small : big;
}

enum Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

inline Activation parse_activation(const std::string& name) {
  if (name == "silu") return kSilu;
  if (name == "gelu") return kGelu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "relu") return kRelu;
  TORCH_CHECK(false, "mixlora_cpu: activation must be one of silu, gelu, gelu_tanh, relu; got '", name, "'");
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhC = 0.044715f;

// σ(g) (mixlora_kernels.activations.activation).
template <int ACT>
MIXLORA_INLINE float act_value(float g) {
  if constexpr (ACT == kSilu) {
    return g / (1.0f + exp_f(-g));
  } else if constexpr (ACT == kGelu) {
    return 0.5f * g * (1.0f + erf_f(g * kSqrtHalf));
  } else if constexpr (ACT == kGeluTanh) {
    return 0.5f * g * (1.0f + tanh_f(kSqrt2OverPi * (g + kGeluTanhC * g * g * g)));
  } else {
    return g > 0.0f ? g : 0.0f;
  }
}

// σ(g) and σ'(g) (mixlora_kernels.activations.activation_grad).
template <int ACT>
MIXLORA_INLINE void act_value_grad(float g, float& a, float& da) {
  if constexpr (ACT == kSilu) {
    const float sig = 1.0f / (1.0f + exp_f(-g));
    a = g * sig;
    da = sig * (1.0f + g * (1.0f - sig));
  } else if constexpr (ACT == kGelu) {
    const float cdf = 0.5f * (1.0f + erf_f(g * kSqrtHalf));
    a = g * cdf;
    da = cdf + g * exp_f(-0.5f * g * g) * kInvSqrt2Pi;
  } else if constexpr (ACT == kGeluTanh) {
    const float g2 = g * g;
    const float th = tanh_f(kSqrt2OverPi * (g + kGeluTanhC * g2 * g));
    a = 0.5f * g * (1.0f + th);
    da = 0.5f * (1.0f + th) + 0.5f * g * (1.0f - th * th) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhC * g2);
  } else {
    a = g > 0.0f ? g : 0.0f;
    da = g > 0.0f ? 1.0f : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// LoRA dropout: the counter hash of mixlora_kernels.ops._common.dropout_scale. Element (j, c) of an (S, cols) slot
// matrix is kept when hash32((j * cols + c) mod 2^32 XOR seed) >= floor(p * 2^32); all in uint32, as the reference's
// int64 arithmetic reduced mod 2^32.

MIXLORA_INLINE uint32_t hash32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  return (x >> 16) ^ x;
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0;
  uint32_t threshold = 0;  // floor(p * 2^32) < 2^32 for p < 1
  float inv_keep = 1.0f;   // 1 / (1 - p)

  Dropout(double p, int64_t seed_) {
    on = p > 0.0;
    seed = static_cast<uint32_t>(static_cast<uint64_t>(seed_));
    threshold = static_cast<uint32_t>(static_cast<uint64_t>(p * 4294967296.0));  // Python's int(p * 2**32)
    inv_keep = on ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  }
};

// Row base of the hash counter: (slot * cols + c0) mod 2^32.
MIXLORA_INLINE uint32_t hash_base(int64_t slot, int64_t cols, int64_t c0) {
  return static_cast<uint32_t>(slot) * static_cast<uint32_t>(cols) + static_cast<uint32_t>(c0);
}

// Prefetch (for reading) the bytes [p, p + bytes) into the caches, one request per 64-byte line.
MIXLORA_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// ---------------------------------------------------------------------------------------------------------------
// Loads of activations: fp32 as is, bf16 (as its bits) widened exactly.

using bf16_bits = uint16_t;

MIXLORA_INLINE float load(float x) { return x; }
MIXLORA_INLINE float load(bf16_bits x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }

// ---------------------------------------------------------------------------------------------------------------
// Work decomposition.

// Measured on this project's 2-core machine (bench_cpu model, in the training step): blocks of 256 columns were no
// faster than 128; prefetching the token rows 4 tile rows ahead took the expand_act_combine backward from 2.6-2.7 ms
// to 2.2-2.3 ms (a block's gathers are rows of W columns at random tokens, short enough that each one otherwise
// waits for its cache misses), 8 rows ahead was no better.
constexpr int64_t kBlockWidth = 128;   // target columns per block (multiples of 16 except the last)
constexpr int64_t kPrefetchRows = 4;   // tile rows ahead whose token rows the loops prefetch
constexpr int64_t kBlockMultiple = 4;  // blocks per call rounded up to a multiple of this (balanced on 2 / 4 threads)
constexpr int64_t kTileRows = 128;     // slot rows per GEMM tile (one expert's)

// Column-block bounds of I: about kBlockWidth wide, a multiple of kBlockMultiple blocks (at most one per 16 columns),
// bounds on multiples of 16. A function of I alone: the per-block partial sums do not depend on the thread count.
inline std::vector<int64_t> column_blocks(int64_t I) {
  int64_t n = (I + kBlockWidth - 1) / kBlockWidth;
  n = (n + kBlockMultiple - 1) / kBlockMultiple * kBlockMultiple;
  n = std::max<int64_t>(1, std::min(n, (I + 15) / 16));
  std::vector<int64_t> bounds{0};
  for (int64_t c = 1; c < n; ++c) {
    const int64_t b = (2 * c * I + n * 16) / (2 * n * 16) * 16;  // round(c * I / n / 16) * 16
    if (b > bounds.back() && b < I) bounds.push_back(b);
  }
  if (I > 0) bounds.push_back(I);
  return bounds;
}

struct Tile {
  int64_t expert, start, end;  // rows [start, end) of the expert-sorted slots, all of one expert
};

// The routing of one call in expert-sorted order: per position p the slot order[p], its token and weight, and the
// tiles of at most kTileRows rows covering every non-empty expert segment.
struct SortedRouting {
  int64_t T = 0, K = 0, S = 0, E = 0;
  const int64_t* order = nullptr;
  std::vector<int64_t> tokens;
  std::vector<float> weights;
  std::vector<Tile> tiles;

  SortedRouting(const at::Tensor& order_t, const at::Tensor& offsets_t, const at::Tensor& experts,
                const at::Tensor* weights_t) {
    T = experts.size(0);
    K = experts.size(1);
    S = T * K;
    E = offsets_t.numel() - 1;
    TORCH_CHECK(order_t.is_contiguous() && offsets_t.is_contiguous(), "mixlora_cpu: order/offsets must be contiguous");
    order = order_t.data_ptr<int64_t>();
    const int64_t* off = offsets_t.data_ptr<int64_t>();
    TORCH_CHECK(off[0] == 0 && off[E] == S, "mixlora_cpu: offsets must run from 0 to T*K = ", S, ", got ", off[0],
                " .. ", off[E]);
    for (int64_t e = 0; e < E; ++e) {
      TORCH_CHECK(off[e + 1] >= off[e], "mixlora_cpu: offsets must be non-decreasing (expert ", e, ")");
      for (int64_t r = off[e]; r < off[e + 1]; r += kTileRows) tiles.push_back({e, r, std::min(r + kTileRows, off[e + 1])});
    }
    tokens.resize(S);
    for (int64_t p = 0; p < S; ++p) {
      const int64_t j = order[p];
      TORCH_CHECK(j >= 0 && j < S, "mixlora_cpu: order holds slot ", j, " outside [0, ", S, ")");
      tokens[p] = j / K;
    }
    if (weights_t != nullptr) {
      const at::Tensor w = weights_t->to(at::kFloat).contiguous();
      const float* wp = w.data_ptr<float>();
      weights.resize(S);
      for (int64_t p = 0; p < S; ++p) weights[p] = wp[order[p]];
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Rank-R GEMMs on tiles: row-major fp32 operands given by pointer and leading dimension.
//   C (m x n, ldc) = alpha op(A) op(B) + beta C,  op(A) (m x k): A, or Aᵀ of an (k x m) matrix when trans_a.
// The BLAS torch calls for its own fp32 matmuls (its sgemm_, MKL in the x86 wheels), called directly: through
// at::mm on tensor views each call cost ~5 µs of view and dispatch overhead, measured on this 2-core machine (a
// layer's backward has ~800 of them). Inside a parallel region the BLAS runs on the calling thread. Where
// libtorch_cpu exports no sgemm_, at::mm / addmm on views of the same memory.

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

SgemmFn blas_sgemm();  // the BLAS's sgemm_ (Fortran, 32-bit ints), or nullptr (cpu_common.cpp)

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  static const SgemmFn sgemm = blas_sgemm();
  constexpr int64_t kMax = INT32_MAX;
  if (sgemm != nullptr && k > 0 && std::max({m, n, k, lda, ldb, ldc}) < kMax) {
    // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: the operands swap, the flags stay.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int cm = static_cast<int>(n), cn = static_cast<int>(m), ck = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    sgemm(&tb, &ta, &cm, &cn, &ck, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = trans_a ? at::from_blob(const_cast<float*>(A), {k, m}, {lda, 1}, opts).t()
                               : at::from_blob(const_cast<float*>(A), {m, k}, {lda, 1}, opts);
  const at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {n, k}, {ldb, 1}, opts).t()
                               : at::from_blob(const_cast<float*>(B), {k, n}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (k == 0) {
    if (beta == 0.0f) c.zero_(); else c.mul_(beta);
  } else if (beta == 0.0f) {
    at::addmm_out(c, c, a, b, /*beta=*/0.0, alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// fp32, contiguous (a no-op for tensors that already are).
inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Rows of t (S, R) in expert-sorted order, fp32, times `factor`.
inline at::Tensor sorted_rows(const at::Tensor& t, const at::Tensor& order, double factor) {
  at::Tensor out = at::index_select(t.to(at::kFloat), 0, order);
  if (factor != 1.0) out.mul_(factor);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Row loops shared by the LoRA ops: gather a column block of token rows into a slot tile, and add a slot tile back
// into token rows. Static (each translation unit has its own copies and clone resolvers).

// dst[r, i] = keep(r, c0 + i) · w_r · src[t_r, c0 + i] for the tile's rows (keep = 1 without MASK, w_r = 1 without
// WEIGHTED); src (T x ld) in its own dtype, dst (rows x W) fp32.
template <bool MASK, bool WEIGHTED, typename In>
static MIXLORA_CLONES void gather_rows(int64_t rows, int64_t W, int64_t c0, int64_t ld, const In* __restrict src,
                                       const int64_t* __restrict tokens, const int64_t* __restrict slots,
                                       const float* __restrict weights, uint32_t seed, uint32_t threshold,
                                       float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if (kPrefetchRows > 0 && r + kPrefetchRows < rows) {
      prefetch_bytes(src + tokens[r + kPrefetchRows] * ld + c0, W * static_cast<int64_t>(sizeof(In)));
    }
    const In* __restrict row = src + tokens[r] * ld + c0;
    float* __restrict out = dst + r * W;
    const float w = WEIGHTED ? weights[r] : 1.0f;
    const uint32_t base = hash_base(slots[r], ld, c0);
    for (int64_t i = 0; i < W; ++i) {
      float v = load(row[i]);
      if constexpr (WEIGHTED) v = w * v;
      if constexpr (MASK) v = hash32((base + static_cast<uint32_t>(i)) ^ seed) >= threshold ? v : 0.0f;
      out[i] = v;
    }
  }
}

// dst[t_r, c0 + i] += w_r · keep(r, c0 + i) · src[r, i]: src (rows x W) fp32, dst (T x ld) fp32 accumulators.
template <bool MASK, bool WEIGHTED>
static MIXLORA_CLONES void add_rows(int64_t rows, int64_t W, int64_t c0, int64_t ld, const float* __restrict src,
                                    const int64_t* __restrict tokens, const int64_t* __restrict slots,
                                    const float* __restrict weights, uint32_t seed, uint32_t threshold,
                                    float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if (kPrefetchRows > 0 && r + kPrefetchRows < rows) {
      prefetch_bytes(dst + tokens[r + kPrefetchRows] * ld + c0, W * static_cast<int64_t>(sizeof(float)));
    }
    const float* __restrict in = src + r * W;
    float* __restrict out = dst + tokens[r] * ld + c0;
    const float w = WEIGHTED ? weights[r] : 1.0f;
    const uint32_t base = hash_base(slots[r], ld, c0);
    for (int64_t i = 0; i < W; ++i) {
      float v = in[i];
      if constexpr (WEIGHTED) v = w * v;
      if constexpr (MASK) v = hash32((base + static_cast<uint32_t>(i)) ^ seed) >= threshold ? v : 0.0f;
      out[i] += v;
    }
  }
}

// Zero columns [c0, c0 + W) of the rows of a (T x ld) fp32 accumulator.
inline void zero_columns(float* acc, int64_t T, int64_t ld, int64_t c0, int64_t W) {
  for (int64_t t = 0; t < T; ++t) std::fill(acc + t * ld + c0, acc + t * ld + c0 + W, 0.0f);
}

// The activations a loop reads, in one dtype: bf16 as is, fp32 as is, anything else (fp16, mixed) widened to fp32.
inline at::ScalarType loop_dtype(std::initializer_list<const at::Tensor*> ts) {
  const at::ScalarType first = (*ts.begin())->scalar_type();
  for (const at::Tensor* t : ts) {
    if (t != nullptr && t->scalar_type() != first) return at::kFloat;
  }
  return first == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

template <typename F>
void dispatch_input(at::ScalarType dtype, const F& f) {
  if (dtype == at::kBFloat16) {
    f(bf16_bits{});
  } else {
    f(float{});
  }
}

template <typename In>
const In* data_as(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const In*>(t.data_ptr()) : nullptr;
}

// The result like `ref` (its dtype), from an fp32 result.
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref) {
  return t.scalar_type() == ref.scalar_type() ? t : t.to(ref.scalar_type());
}

template <typename F>
void dispatch_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
void dispatch_activation(Activation act, const F& f) {
  switch (act) {
    case kSilu: f(std::integral_constant<int, kSilu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
  }
}

inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mixlora_cpu::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "mixlora_cpu::", op, ": ", name, " must be float32, bfloat16 or float16 (float64 is served by the "
              "reference), got ", t.scalar_type());
}

}  // namespace mixlora_cpu
