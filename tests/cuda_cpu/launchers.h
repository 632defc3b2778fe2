// Glue of the C ABI launchers tests/cuda_cpu/launch_<op>.cpp: each mirrors the launch function of
// csrc/<op>/<op>.cu (same early returns, grids, block sizes, dynamic shared memory, dtype dispatch), with raw
// pointers in place of at::Tensor, and returns 0, or 1 with the message in cuda_cpu_last_error().
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace cuda_cpu {

// Runs `launches`; an exception becomes return value 1 and the message of cuda_cpu_last_error().
int guarded(const std::function<void()>& launches);

// The dtype codes of cuda_cpu_harness.py: 0 float32, 1 float16, 2 bfloat16. Calls f(scalar_t{}).
template <typename F>
void dispatch_float_half_bf16(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(c10::Half{});
    case 2:
      return f(c10::BFloat16{});
    default:
      throw std::runtime_error("unknown dtype code " + std::to_string(dtype));
  }
}

inline unsigned int ceil_div(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace cuda_cpu
