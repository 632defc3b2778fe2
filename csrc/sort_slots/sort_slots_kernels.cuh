// The device code of sort_slots: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in sort_slots.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace mixlora {
namespace {

constexpr int kThreads = 256;

// One thread per slot: validate the expert id, write the sort key and the slot id.
template <typename index_t>
__global__ void sort_slots_keys_kernel(const index_t* __restrict__ experts, int64_t num_experts,
                                       int64_t num_slots, uint32_t* __restrict__ keys,
                                       int64_t* __restrict__ slots) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_slots) {
    return;
  }
  const int64_t e = static_cast<int64_t>(experts[j]);
  CUDA_KERNEL_ASSERT(e >= 0 && e < num_experts && "sort_slots: expert id out of range [0, num_experts)");
  keys[j] = static_cast<uint32_t>(e);
  slots[j] = j;
}

// One thread per boundary e = 0..E: offsets[e] = first position whose sorted key is >= e.
// offsets[0] = 0 and offsets[E] = S because every key is in [0, E).
__global__ void sort_slots_offsets_kernel(const uint32_t* __restrict__ sorted_keys, int64_t num_slots,
                                          int64_t num_experts, int64_t* __restrict__ offsets) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e > num_experts) {
    return;
  }
  int64_t lo = 0;
  int64_t hi = num_slots;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(sorted_keys[mid]) < e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[e] = lo;
}

}  // namespace
}  // namespace mixlora
