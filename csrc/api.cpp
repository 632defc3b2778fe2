// mixlora_kernels._C: op schemas, input checks and launches for the CUDA kernels in csrc/<op>/.
//
// Importing mixlora_kernels._C (after torch) registers the ops under torch.ops.mixlora_cuda. The Python op
// registry (mixlora_kernels/ops/) installs them on top of its torch references for CUDA tensors.

#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h (same getCurrentCUDAStream): the latter pulls in
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart + CCCL, as in CI) does not ship.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "sort_slots/sort_slots.h"

namespace mixlora {
namespace {

// Checks shared by the CUDA and Meta kernels; the device and the slot count are checked by the CUDA kernel only
// (the Meta kernel may see symbolic sizes).
void check_sort_slots_inputs(const at::Tensor& experts, int64_t num_experts) {
  TORCH_CHECK(experts.dim() == 2, "sort_slots: experts must be 2-D (T, K), got shape ", experts.sym_sizes());
  TORCH_CHECK(experts.scalar_type() == at::kInt || experts.scalar_type() == at::kLong,
              "sort_slots: experts must be int32 or int64, got ", experts.scalar_type());
  TORCH_CHECK(experts.is_contiguous(), "sort_slots: experts must be contiguous, got strides ",
              experts.sym_strides());
  TORCH_CHECK(num_experts >= 1 && num_experts < (int64_t{1} << 20),
              "sort_slots: num_experts must be in [1, 2^20), got ", num_experts);
}

// Token permutation by routed expert.
//   experts  (T, K) int32 or int64, CUDA, contiguous: the expert of slot j = t*K + k, each in [0, num_experts)
// Returns (order, offsets), int64 on experts' device:
//   order    (T*K,)  argsort(experts.reshape(-1), stable=True): slot ids in expert-major, token-minor order
//   offsets  (E+1,)  [0, cumsum(bincount(experts.reshape(-1), minlength=E))]
// Ids out of [0, num_experts) trigger a device-side assertion (see csrc/sort_slots/sort_slots.cu).
std::tuple<at::Tensor, at::Tensor> sort_slots_cuda(const at::Tensor& experts, int64_t num_experts) {
  TORCH_CHECK(experts.is_cuda(), "sort_slots: experts must be a CUDA tensor, got ", experts.device());
  check_sort_slots_inputs(experts, num_experts);
  TORCH_CHECK(experts.numel() < (int64_t{1} << 31), "sort_slots: experts must have T*K < 2^31 slots, got ",
              experts.size(0), "*", experts.size(1), " = ", experts.numel());

  const c10::cuda::CUDAGuard device_guard(experts.device());
  const auto long_options = experts.options().dtype(at::kLong);
  at::Tensor order = at::empty({experts.numel()}, long_options);
  at::Tensor offsets = at::empty({num_experts + 1}, long_options);
  sort_slots_launch(experts, num_experts, order, offsets, c10::cuda::getCurrentCUDAStream());
  return {order, offsets};
}

// Output shapes do not depend on the data, so torch.compile / opcheck can trace the op with meta tensors.
std::tuple<at::Tensor, at::Tensor> sort_slots_meta(const at::Tensor& experts, int64_t num_experts) {
  check_sort_slots_inputs(experts, num_experts);
  const auto long_options = experts.options().dtype(at::kLong);
  return {at::empty_symint({experts.sym_numel()}, long_options), at::empty({num_experts + 1}, long_options)};
}

// The op only has CUDA kernels; without this the dispatcher's "could not run with the CPU backend" error
// would not say what the op expects.
std::tuple<at::Tensor, at::Tensor> sort_slots_cpu(const at::Tensor& experts, int64_t /*num_experts*/) {
  TORCH_CHECK(false, "sort_slots: experts must be a CUDA tensor, got ", experts.device());
}

}  // namespace
}  // namespace mixlora

TORCH_LIBRARY(mixlora_cuda, m) {
  m.def("sort_slots(Tensor experts, int num_experts) -> (Tensor order, Tensor offsets)");
}

TORCH_LIBRARY_IMPL(mixlora_cuda, CUDA, m) {
  m.impl("sort_slots", &mixlora::sort_slots_cuda);
}

TORCH_LIBRARY_IMPL(mixlora_cuda, Meta, m) {
  m.impl("sort_slots", &mixlora::sort_slots_meta);
}

TORCH_LIBRARY_IMPL(mixlora_cuda, CPU, m) {
  m.impl("sort_slots", &mixlora::sort_slots_cpu);
}

// Empty: importing the module only has to load the library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
