// The part of CUDA's <cuda_bf16.h> the kernels use, for the CPU harness (found before the toolkit's header through
// -I tests/cuda_cpu): __nv_bfloat16 is c10::BFloat16 (same 16 bits, round-to-nearest-even conversion).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return c10::BFloat16(v);
}
inline float __bfloat162float(__nv_bfloat16 v) {
  return static_cast<float>(v);
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}
