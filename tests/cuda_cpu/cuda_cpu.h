// The CUDA built-ins that the kernels in csrc/ use, for compiling the same kernel text with the host compiler
// (g++ -x c++ -std=c++17 -O1) and running it on the CPU; test infrastructure (how threads are scheduled: cuda_cpu.cpp).
//
// Force-included (-include cuda_cpu.h) before a kernel header. What it supplies, and nothing else:
//   - qualifiers: __global__, __device__, __host__, __forceinline__, __launch_bounds__ (no-ops on the CPU);
//   - __shared__: block-scope thread_local, i.e. one instance shared by all threads of the running block (the
//     harness runs one block at a time, on one OS thread). `extern __shared__` (dynamic shared memory) has one
//     declaration, mixlora::dynamic_smem in csrc/common.cuh (a kernel's own `extern __shared__` array would not
//     link): a buffer whose launch's bytes are followed by a canary checked after every block. All shared memory
//     is filled with NaN (0xff bytes) before every block; an out-of-bounds access to a shared array, by index or
//     through a pointer the compiler traces to it, is a fault (-fsanitize=bounds,object-size);
//   - threadIdx, blockIdx, blockDim, gridDim, warpSize, dim3, uint3, float2, float4, int4, uint2, uint4;
//   - __syncthreads(): a barrier over the block's threads; all of them must reach the same call site;
//   - warp collectives (__shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, __ballot_sync,
//     __any_sync, __all_sync, __syncwarp): every lane named in the mask must reach a collective of the same kind
//     with the same mask; the values are exchanged when the last one arrives;
//   - CUDA_KERNEL_ASSERT: a failed assertion aborts the launch with an error naming the block and the thread;
//   - bf16/half: the kernels use c10::BFloat16 / c10::Half (the dispatch's scalar_t), whose host code is the
//     real one; no atomics are used by the kernels, so none is emulated;
//   - tensor cores: the register tiles of csrc/tensor_core.cuh (mma.sync m16n8k16, ldmatrix .x4, in the PTX ISA's
//     layouts) come from tests/cuda_cpu/mma_sync.h, which tensor_core.cuh includes under MIXLORA_CUDA_CPU, and
//     __nv_bfloat16 from cuda_bf16.h, which the kernels' `#include <cuda_bf16.h>` finds first (-I tests/cuda_cpu);
//     __expf / __fdividef are exact here;
//   - cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): a checked no-op (the
//     launch itself refuses more than sm_90's 227 KiB).
// Launches: CUDA_CPU_LAUNCH(kernel, grid, block, smem, args...) runs kernel<<<grid, block, smem>>>(args...) to
// completion; an error in the kernel throws cuda_cpu::Error.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define MIXLORA_CUDA_CPU 1  // csrc/tensor_core.cuh: the register-tile instructions come from mma_sync.h

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

struct alignas(8) uint2 {
  unsigned int x, y;
};

struct alignas(16) int4 {
  int x, y, z, w;
};

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

constexpr int warpSize = 32;

using std::isnan;

// The fast-math intrinsics (the GPU's approximate ex2 / rcp; exact here).
inline float __expf(float x) {
  return std::exp(x);
}
inline float __fdividef(float a, float b) {
  return a / b;
}

namespace cuda_cpu {

// A kernel fault (failed assertion, out-of-bounds shared access, misused barrier or collective) or a bad launch.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The running thread's built-in variables.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads(const char* file, int line);
[[noreturn]] void fault(const std::string& what);

enum class Collective { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };

// Blocks the calling lane until every lane of `mask` has reached a collective of kind `kind` with that mask, then
// returns this lane's result: the bits of the source lane's `bits` for a shuffle, the vote for the votes.
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t bits, int arg, int width, const char* name);

template <typename T>
T shuffle(Collective kind, unsigned mask, T var, int arg, int width, const char* name) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(kind, mask, bits, arg, width, name);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

// Runs `body` (one call per CUDA thread) as the grid `grid` x `block` with `smem` bytes of dynamic shared memory.
void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// kernel<<<grid, block, smem>>>(args...): the arguments are converted to the kernel's parameter types once, as a
// CUDA launch copies them, and every thread gets its own copy of them.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(name, grid, block, smem, [&] { std::apply(kernel, params); });
}

}  // namespace cuda_cpu

enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

template <typename F>
cudaError_t cudaFuncSetAttribute(F* /*kernel*/, cudaFuncAttribute /*attr*/, int value) {
  if (value < 0 || value > 227 * 1024) {
    throw cuda_cpu::Error("cudaFuncSetAttribute: " + std::to_string(value) +
                          " bytes of dynamic shared memory exceed sm_90's 227 KiB per block");
  }
  return cudaSuccess;
}

#define CUDA_CPU_LAUNCH(kernel, grid, block, smem, ...) \
  ::cuda_cpu::launch(#kernel, kernel, grid, block, smem, __VA_ARGS__)

#define threadIdx (::cuda_cpu::thread_idx())
#define blockIdx (::cuda_cpu::block_idx())
#define blockDim (::cuda_cpu::block_dim())
#define gridDim (::cuda_cpu::grid_dim())

#define __syncthreads() ::cuda_cpu::syncthreads(__FILE__, __LINE__)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                         \
  if (C10_UNLIKELY(!(cond))) {                                                                           \
    ::cuda_cpu::fault(std::string("device assertion `" #cond "` failed at ") + __FILE__ + ":" +          \
                      std::to_string(__LINE__));                                                         \
  }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return cuda_cpu::shuffle(cuda_cpu::Collective::kShfl, mask, var, src_lane, width, "__shfl_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_cpu::shuffle(cuda_cpu::Collective::kShflUp, mask, var, static_cast<int>(delta), width,
                           "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_cpu::shuffle(cuda_cpu::Collective::kShflDown, mask, var, static_cast<int>(delta), width,
                           "__shfl_down_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return cuda_cpu::shuffle(cuda_cpu::Collective::kShflXor, mask, var, lane_mask, width, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(
      cuda_cpu::warp_collective(cuda_cpu::Collective::kBallot, mask, predicate != 0, 0, warpSize, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      cuda_cpu::warp_collective(cuda_cpu::Collective::kAny, mask, predicate != 0, 0, warpSize, "__any_sync"));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      cuda_cpu::warp_collective(cuda_cpu::Collective::kAll, mask, predicate != 0, 0, warpSize, "__all_sync"));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_cpu::warp_collective(cuda_cpu::Collective::kSyncWarp, mask, 0, 0, warpSize, "__syncwarp");
}
