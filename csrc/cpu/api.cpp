// mixlora_kernels._cpu: the C++ CPU kernels, registered as torch.ops.mixlora_cpu.* with CPU kernels only.
//
// The Python op registry (mixlora_kernels/ops/) serves CPU tensors of fp32/bf16/fp16 with them through
// mixlora_kernels.cpu (which runs the input checks of mixlora_kernels.checks first); fp64 stays on the references.
// Importing the module (after torch) registers the ops; it exports nothing to Python itself.

#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_common.h"

namespace mixlora_cpu {

std::tuple<at::Tensor, at::Tensor> expand_act_combine_cpu(
    const at::Tensor& G, const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
    const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights, const at::Tensor& experts,
    const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& Ad, double scale,
    const std::string& activation_name, double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expand_act_combine_backward_cpu(const at::Tensor& grad_hbar, const at::Tensor& grad_zd, const at::Tensor& G,
                                const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
                                const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                                const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                const at::Tensor& Ad, double scale, const std::string& activation_name,
                                double dropout_p, int64_t seed);

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts,
                           const at::Tensor& order, const at::Tensor& offsets, double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                                            const at::Tensor& A, const at::Tensor& experts,
                                                            const at::Tensor& order, const at::Tensor& offsets,
                                                            double dropout_p, int64_t seed);

at::Tensor lora_expand_combine_cpu(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                   const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                   double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_combine_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets, double scale);

namespace {

// The keep mask the kernels apply to the rows `slots` (N,) of an (S, cols) slot matrix: (N, cols) bool, True where
// element (slot, c) is kept (mixlora_kernels.ops._common.dropout_scale != 0). The kernels' hash, for the tests.
MIXLORA_CLONES void keep_rows(int64_t n, int64_t cols, const int64_t* slots, uint32_t seed, uint32_t threshold,
                              bool* out) {
  for (int64_t r = 0; r < n; ++r) {
    const uint32_t base = hash_base(slots[r], cols, 0);
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = hash32((base + static_cast<uint32_t>(c)) ^ seed) >= threshold;
  }
}

at::Tensor dropout_keep(const at::Tensor& slots, int64_t cols, double p, int64_t seed) {
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1,
              "mixlora_cpu::dropout_keep: slots must be a 1-D int64 CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "mixlora_cpu::dropout_keep: p must be in [0, 1), got ", p);
  const at::Tensor s = slots.contiguous();
  at::Tensor out = at::empty({s.numel(), cols}, s.options().dtype(at::kBool));
  const Dropout drop(p, seed);
  keep_rows(s.numel(), cols, s.data_ptr<int64_t>(), drop.seed, drop.threshold, out.data_ptr<bool>());
  return out;
}

// [rows per expert tile, column-block bounds of I...]: the work decomposition of expand_act_combine, for the tests.
std::vector<int64_t> layout(int64_t I) {
  std::vector<int64_t> out{kTileRows};
  for (int64_t b : column_blocks(I)) out.push_back(b);
  return out;
}

}  // namespace
}  // namespace mixlora_cpu

TORCH_LIBRARY(mixlora_cpu, m) {
  m.def("expand_act_combine(Tensor G, Tensor? U, Tensor zg, Tensor Bg, Tensor zu, Tensor Bu, Tensor weights, "
        "Tensor experts, Tensor order, Tensor offsets, Tensor Ad, float scale, str activation_name, float dropout_p, "
        "int seed) -> (Tensor, Tensor)");
  m.def("expand_act_combine_backward(Tensor grad_hbar, Tensor grad_zd, Tensor G, Tensor? U, Tensor zg, Tensor Bg, "
        "Tensor zu, Tensor Bu, Tensor weights, Tensor experts, Tensor order, Tensor offsets, Tensor Ad, float scale, "
        "str activation_name, float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("lora_shrink(Tensor x, Tensor A, Tensor experts, Tensor order, Tensor offsets, float dropout_p, int seed) "
        "-> Tensor");
  m.def("lora_shrink_backward(Tensor grad_z, Tensor x, Tensor A, Tensor experts, Tensor order, Tensor offsets, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_expand_combine(Tensor zd, Tensor B, Tensor weights, Tensor experts, Tensor order, Tensor offsets, "
        "float scale) -> Tensor");
  m.def("lora_expand_combine_backward(Tensor grad_y, Tensor zd, Tensor B, Tensor weights, Tensor experts, "
        "Tensor order, Tensor offsets, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("dropout_keep(Tensor slots, int cols, float p, int seed) -> Tensor");
  m.def("layout(int I) -> int[]");
}

TORCH_LIBRARY_IMPL(mixlora_cpu, CPU, m) {
  m.impl("expand_act_combine", &mixlora_cpu::expand_act_combine_cpu);
  m.impl("expand_act_combine_backward", &mixlora_cpu::expand_act_combine_backward_cpu);
  m.impl("lora_shrink", &mixlora_cpu::lora_shrink_cpu);
  m.impl("lora_shrink_backward", &mixlora_cpu::lora_shrink_backward_cpu);
  m.impl("lora_expand_combine", &mixlora_cpu::lora_expand_combine_cpu);
  m.impl("lora_expand_combine_backward", &mixlora_cpu::lora_expand_combine_backward_cpu);
  m.impl("dropout_keep", &mixlora_cpu::dropout_keep);
}

// No tensor arguments: a CompositeExplicitAutograd kernel serves it without a device.
TORCH_LIBRARY_IMPL(mixlora_cpu, CompositeExplicitAutograd, m) { m.impl("layout", &mixlora_cpu::layout); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
