// C ABI launcher of csrc/sort_slots/sort_slots_kernels.cuh, mirroring sort_slots_launch of
// csrc/sort_slots/sort_slots.cu (see launchers.h). cub::DeviceRadixSort::SortPairs, a library call between the
// two kernels, is stood in for by a stable sort on the same key bits.
#include <algorithm>
#include <numeric>
#include <vector>

#include "launchers.h"
#include "sort_slots/sort_slots_kernels.cuh"

using namespace mixlora;

namespace {

// sort_slots.cu's key_bits: the key bits the radix sort looks at.
int key_bits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) < num_experts) {
    ++bits;
  }
  return bits;
}

// cub::DeviceRadixSort::SortPairs(keys -> sorted_keys, slots -> order) on bits [0, end_bit): stable.
void sort_pairs(const uint32_t* keys, uint32_t* sorted_keys, const int64_t* slots, int64_t* order, int64_t n,
                int end_bit) {
  const uint32_t bits = end_bit >= 32 ? ~0u : (1u << end_bit) - 1u;
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return (keys[a] & bits) < (keys[b] & bits); });
  for (int64_t p = 0; p < n; ++p) {
    sorted_keys[p] = keys[perm[p]];
    order[p] = slots[perm[p]];
  }
}

}  // namespace

extern "C" {

// experts (T, K) contiguous, int32 (index_bits 32) or int64; writes order (S,) and offsets (E+1,) int64.
int cuda_cpu_sort_slots(int index_bits, const void* experts, int64_t num_slots, int64_t num_experts, int64_t* order,
                        int64_t* offsets) {
  return cuda_cpu::guarded([&] {
    std::vector<uint32_t> sorted_keys(num_slots);
    if (num_slots > 0) {
      std::vector<uint32_t> keys(num_slots);
      std::vector<int64_t> slots(num_slots);
      const unsigned int grid = cuda_cpu::ceil_div(num_slots, kThreads);
      if (index_bits == 32) {
        CUDA_CPU_LAUNCH(sort_slots_keys_kernel<int32_t>, grid, kThreads, 0, static_cast<const int32_t*>(experts),
                        num_experts, num_slots, keys.data(), slots.data());
      } else {
        CUDA_CPU_LAUNCH(sort_slots_keys_kernel<int64_t>, grid, kThreads, 0, static_cast<const int64_t*>(experts),
                        num_experts, num_slots, keys.data(), slots.data());
      }
      sort_pairs(keys.data(), sorted_keys.data(), slots.data(), order, num_slots, key_bits(num_experts));
    }
    CUDA_CPU_LAUNCH(sort_slots_offsets_kernel, cuda_cpu::ceil_div(num_experts + 1, kThreads), kThreads, 0,
                    sorted_keys.data(), num_slots, num_experts, offsets);
  });
}

}  // extern "C"
