// Token permutation by routed expert: declarations shared by csrc/api.cpp and sort_slots.cu.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

namespace mixlora {

// Fills the expert-sorted slot order and the expert offsets for `experts` on `stream`.
//   experts  (T, K) int32 or int64, CUDA, contiguous, every id in [0, num_experts)  (checked by the caller,
//            except the id range, which the kernel checks with a device assertion)
//   order    (T*K,) int64, same device: order[p] = slot j = t*K + k at expert-sorted position p
//   offsets  (num_experts + 1,) int64, same device: expert e owns positions [offsets[e], offsets[e+1])
// The caller has already made experts' device current (CUDAGuard). No host synchronisation.
void sort_slots_launch(const at::Tensor& experts, int64_t num_experts, at::Tensor& order, at::Tensor& offsets,
                       cudaStream_t stream);

}  // namespace mixlora
