// Token permutation by routed expert (docs/algorithm.md §3).
//
// Semantics, identical to the pure-torch reference (S = T*K slots, slot j = t*K + k):
//   flat    = experts.reshape(-1)
//   offsets = cat([0], cumsum(bincount(flat, minlength=E)))    (E+1,) int64
//   order   = argsort(flat, stable=True)                        (S,)   int64
//
// Algorithm: a stable LSD radix sort of the pairs (expert id, slot id) over only the low ceil(log2 E) bits, then
// one binary search per expert boundary in the sorted ids.
//   1. sort_slots_keys_kernel writes key[j] = experts[j] (asserting 0 <= id < E) and value[j] = j;
//   2. cub::DeviceRadixSort::SortPairs sorts by key; value lands in `order`;
//   3. sort_slots_offsets_kernel: offsets[e] = number of sorted keys < e (lower bound), e = 0..E.
// Why a radix sort rather than a histogram + one-block-per-expert placement: the latter reads all S slots once
// per expert (E*S work on only E thread blocks); the radix sort does ceil(log2 E / 8) passes over S on the
// whole GPU, for any E.
//
// Deterministic: DeviceRadixSort is stable (slots of one expert keep ascending slot order, i.e. token order),
// so the sorted output is the unique stable permutation whatever the scheduling; the offsets are binary
// searches, no atomics anywhere. No host synchronisation: the temp-storage size query is computed on the host
// without touching the stream, scratch comes from the caching allocator, every launch is asynchronous on
// `stream`.
//
// Out-of-range ids are caught by CUDA_KERNEL_ASSERT in kernel 1 (a device-side assertion: the failure surfaces
// at the next synchronising CUDA call as "device-side assert triggered", and the CUDA context is unusable
// afterwards). Checking on the host would need a device-to-host copy, i.e. a sync on the hot path.

#include "sort_slots.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <cub/device/device_radix_sort.cuh>

#include "sort_slots/sort_slots_kernels.cuh"

namespace mixlora {
namespace {

// Number of key bits the radix sort must look at so that ids 0..E-1 are ordered (at least 1: cub needs a
// non-empty bit range).
int key_bits(int64_t num_experts) {
  int bits = 1;
  while ((int64_t{1} << bits) < num_experts) {
    ++bits;
  }
  return bits;
}

unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

}  // namespace

void sort_slots_launch(const at::Tensor& experts, int64_t num_experts, at::Tensor& order, at::Tensor& offsets,
                       cudaStream_t stream) {
  const int64_t num_slots = experts.numel();
  // Scratch tensors come from the caching allocator on the current stream, which is `stream` (api.cpp), so
  // releasing them when this function returns is stream-ordered after the kernels that use them.
  at::Tensor sorted_keys = at::empty({num_slots}, experts.options().dtype(at::kInt));
  uint32_t* sorted_keys_ptr = reinterpret_cast<uint32_t*>(sorted_keys.mutable_data_ptr<int32_t>());

  // With no slot there is nothing to sort (cub and a 0-block grid would reject it); every offset is then 0.
  if (num_slots > 0) {
    at::Tensor keys = at::empty({num_slots}, experts.options().dtype(at::kInt));
    at::Tensor slots = at::empty({num_slots}, experts.options().dtype(at::kLong));
    uint32_t* keys_ptr = reinterpret_cast<uint32_t*>(keys.mutable_data_ptr<int32_t>());
    int64_t* slots_ptr = slots.mutable_data_ptr<int64_t>();

    AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "sort_slots", [&] {
      sort_slots_keys_kernel<index_t><<<num_blocks(num_slots), kThreads, 0, stream>>>(
          experts.const_data_ptr<index_t>(), num_experts, num_slots, keys_ptr, slots_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    // The caller guarantees num_slots < 2^31, so cub's int item count cannot overflow.
    const int num_items = static_cast<int>(num_slots);
    const int end_bit = key_bits(num_experts);
    int64_t* order_ptr = order.mutable_data_ptr<int64_t>();
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_ptr, sorted_keys_ptr, slots_ptr,
                                                   order_ptr, num_items, 0, end_bit, stream));
    at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, experts.options().dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.mutable_data_ptr(), temp_bytes, keys_ptr, sorted_keys_ptr,
                                                   slots_ptr, order_ptr, num_items, 0, end_bit, stream));
  }

  sort_slots_offsets_kernel<<<num_blocks(num_experts + 1), kThreads, 0, stream>>>(
      sorted_keys_ptr, num_slots, num_experts, offsets.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixlora
