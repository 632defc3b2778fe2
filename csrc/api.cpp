// mixlora_kernels._C: op schemas, input checks and launches for the CUDA kernels in csrc/<op>/.
//
// Importing mixlora_kernels._C (after torch) registers the ops under torch.ops.mixlora_cuda, with CUDA and Meta
// kernels only: the Python op registry (mixlora_kernels/ops/) installs them on top of its torch references for
// CUDA tensors, so CPU tensors never reach them (called directly with CPU tensors, the dispatcher refuses).

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h (same getCurrentCUDAStream): the latter pulls in
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart + CCCL, as in CI) does not ship.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "expand_act_combine/expand_act_combine.h"
#include "lora_expand_combine/lora_expand_combine.h"
#include "lora_shrink/lora_shrink.h"
#include "route/route.h"
#include "router_logits/router_logits.h"
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

// ---------------------------------------------------------------------------------------------------------------
// LoRA and routing ops (lora_shrink, lora_expand_combine, expand_act_combine, route, router_logits; forward and
// backward).
//
// Argument order and semantics mirror the registered mixlora:: ops (mixlora_kernels/ops/<op>.py); their pure-torch
// references define the results. Dtype policy of the CUDA kernels:
//   - the large activations x, G, U, grad_y, grad_hbar and logits are read in their own dtype (fp32, fp16, bf16);
//   - expand_act_combine reads its LoRA weights (Bg, Bu, Ad) as they are when they have G's dtype (its bf16
//     tensor-core kernels multiply them in bf16 directly); weights of another dtype become fp32 copies;
//   - lora_shrink reads A as it is when it has x's dtype (else an fp32 copy); lora_expand_combine reads B as it
//     is (backward: when grad_y is fp32 or has B's dtype, else an fp32 copy);
//   - the other small tensors (rank-R vectors z, routing weights) are converted to
//     fp32 here (a no-op when already fp32, and exact otherwise, as the references compute in fp32 from the same
//     values);
//   - everything accumulates in fp32; outputs take the reference dtypes: rank-R outputs and y in fp32, hbar in
//     G's dtype, every gradient in its input's dtype;
//   - fp64 is refused with a clear error (the torch reference serves it: MIXLORA_BACKEND=torch).
// Layouts: a row stride is accepted for every 2-D tensor (zg, zu = z.split(...), G/U halves of a fused GEMM) and
// any stride(0), stride(1) for the 3-D weights (Bg = B[:, :I], Bu = B[:, I:]); only the innermost stride must be
// 1, otherwise the tensor is made contiguous here. Expert ids are range-checked on the device (see
// csrc/lora_shrink/lora_shrink.cu); nothing here reads device memory on the host (no synchronisation).
// The checks shared by the CUDA and Meta kernels use concrete sizes: these ops are traced through the Python
// mixlora:: ops, whose fake kernels handle symbolic shapes.

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Every tensor is a CUDA tensor on the device of the first one; the error names the offending tensor.
void check_cuda(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  for (const NamedTensor& named : tensors) {
    TORCH_CHECK(named.second->is_cuda(), op, ": ", named.first, " must be a CUDA tensor, got ",
                named.second->device());
    TORCH_CHECK(named.second->device() == first.second->device(), op, ": ", named.first, " is on ",
                named.second->device(), " but ", first.first, " is on ", first.second->device());
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t d = 0; d < shape.size(); ++d) {
    out += (d ? ", " : "") + (shape[d] < 0 ? std::string("*") : std::to_string(shape[d]));
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

// A float32/float16/bfloat16 tensor of the given shape (-1 = any size); the message names it and the expectation.
void check_float(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& shape) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype,
              dtype == at::kDouble ? " (float64 is served by the torch reference only: MIXLORA_BACKEND=torch)" : "");
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) {
    ok = shape[d] < 0 || t.size(static_cast<int64_t>(d)) == shape[d];
  }
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", shape_string(shape), ", got ", t.sizes());
}

// experts (T, K) int32/int64, order (T*K,) int64, offsets (E+1,) int64.
void check_routing(const char* op, const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                   int64_t T, int64_t num_experts) {
  TORCH_CHECK(experts.scalar_type() == at::kInt || experts.scalar_type() == at::kLong, op,
              ": experts must be int32 or int64, got ", experts.scalar_type());
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == T, op, ": experts must have shape (T, K) = (", T,
              ", *), got ", experts.sizes());
  const int64_t S = experts.numel();
  TORCH_CHECK(order.scalar_type() == at::kLong, op, ": order must be int64, got ", order.scalar_type());
  TORCH_CHECK(order.dim() == 1 && order.size(0) == S, op, ": order must have shape (T*K,) = (", S, ",), got ",
              order.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == num_experts + 1, op, ": offsets must have shape (E+1,) = (",
              num_experts + 1, ",), got ", offsets.sizes());
  TORCH_CHECK(num_experts < 65536, op, ": E = ", num_experts, " experts exceed the 65535 this kernel version supports");
  TORCH_CHECK(S < (int64_t{1} << 31), op, ": T*K = ", S, " slots exceed the 2^31 - 1 of the kernels' 32-bit slot ids");
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// The innermost stride is 1 (other strides are passed to the kernels), else a contiguous copy.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

at::Tensor float_inner(const at::Tensor& t) {
  return unit_inner_stride(t.scalar_type() == at::kFloat ? t : t.to(at::kFloat));
}

// The largest element offset of t from its data pointer (0 when empty).
int64_t max_offset(const at::Tensor& t) {
  int64_t off = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) {
      return 0;
    }
    off += (t.size(d) - 1) * t.stride(d);
  }
  return off;
}

// The kernels address the LoRA weights with 32-bit offsets.
const at::Tensor& check_32bit_span(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(max_offset(t) < (int64_t{1} << 31), op, ": ", name,
              " must span fewer than 2^31 elements (32-bit weight offsets), got sizes ", t.sizes(), " strides ",
              t.strides());
  return t;
}

at::Tensor float_contiguous(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// A LoRA weight the kernels read as it is when it has the activations' dtype, else an fp32 copy (the kernels are
// instantiated for weights in the activations' dtype and in fp32).
at::Tensor weight_as_is(const at::Tensor& w, const at::Tensor& activations) {
  return w.scalar_type() == activations.scalar_type() ? unit_inner_stride(w) : float_inner(w);
}

at::Tensor like_dtype(const at::Tensor& fp32, const at::Tensor& like) {
  return like.scalar_type() == at::kFloat ? fp32 : fp32.to(like.scalar_type());
}

// ----- lora_shrink -----

void check_lora_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts, const at::Tensor& order,
                       const at::Tensor& offsets, double dropout_p) {
  const char* op = "lora_shrink";
  check_float(op, "x", x, {-1, -1});
  check_float(op, "A", A, {-1, -1, x.size(1)});
  check_routing(op, experts, order, offsets, x.size(0), A.size(0));
  check_dropout(op, dropout_p);
}

// x (T, H), A (E, R, H) float; routing from route + sort_slots. Returns z (S, R) fp32: z_j = A_e drop_j(x_t).
at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts,
                            const at::Tensor& order, const at::Tensor& offsets, double dropout_p, int64_t seed) {
  check_cuda("lora_shrink", {{"x", &x}, {"A", &A}, {"experts", &experts}, {"order", &order}, {"offsets", &offsets}});
  check_lora_shrink(x, A, experts, order, offsets, dropout_p);
  const c10::cuda::CUDAGuard device_guard(x.device());
  // H = 0: z_j is an empty sum (the kernel writes nothing then).
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor z = x.size(1) == 0 ? at::zeros({experts.numel(), A.size(1)}, f32)
                                : at::empty({experts.numel(), A.size(1)}, f32);
  lora_shrink_forward_launch(unit_inner_stride(x), check_32bit_span("lora_shrink", "A", weight_as_is(A, x)),
                             order.contiguous(), offsets.contiguous(),
                             experts.size(1), dropout_p, seed, z, c10::cuda::getCurrentCUDAStream());
  return z;
}

at::Tensor lora_shrink_meta(const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts,
                            const at::Tensor& order, const at::Tensor& offsets, double dropout_p, int64_t /*seed*/) {
  check_lora_shrink(x, A, experts, order, offsets, dropout_p);
  return at::empty({experts.numel(), A.size(1)}, x.options().dtype(at::kFloat));
}

void check_lora_shrink_backward(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& A,
                                const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                double dropout_p) {
  check_lora_shrink(x, A, experts, order, offsets, dropout_p);
  check_float("lora_shrink_backward", "grad_z", grad_z, {experts.numel(), A.size(1)});
}

// Returns (dx (T, H) like x, dA (E, R, H) like A).
std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_cuda(const at::Tensor& grad_z, const at::Tensor& x,
                                                             const at::Tensor& A, const at::Tensor& experts,
                                                             const at::Tensor& order, const at::Tensor& offsets,
                                                             double dropout_p, int64_t seed) {
  check_cuda("lora_shrink_backward", {{"grad_z", &grad_z}, {"x", &x}, {"A", &A}, {"experts", &experts},
                                      {"order", &order}, {"offsets", &offsets}});
  check_lora_shrink_backward(grad_z, x, A, experts, order, offsets, dropout_p);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor dx = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor dA = at::empty({A.size(0), A.size(1), A.size(2)}, A.options().dtype(at::kFloat));
  lora_shrink_backward_launch(float_inner(grad_z), unit_inner_stride(x),
                              check_32bit_span("lora_shrink_backward", "A", weight_as_is(A, x)),
                              experts.to(at::kLong).contiguous(), order.contiguous(), offsets.contiguous(), dropout_p,
                              seed, dx, dA, c10::cuda::getCurrentCUDAStream());
  return {dx, like_dtype(dA, A)};
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_meta(const at::Tensor& grad_z, const at::Tensor& x,
                                                             const at::Tensor& A, const at::Tensor& experts,
                                                             const at::Tensor& order, const at::Tensor& offsets,
                                                             double dropout_p, int64_t /*seed*/) {
  check_lora_shrink_backward(grad_z, x, A, experts, order, offsets, dropout_p);
  return {at::empty({x.size(0), x.size(1)}, x.options()), at::empty({A.size(0), A.size(1), A.size(2)}, A.options())};
}

// ----- lora_expand_combine -----

void check_lora_expand_combine(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                               const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets) {
  const char* op = "lora_expand_combine";
  TORCH_CHECK(experts.dim() == 2, op, ": experts must have shape (T, K), got ", experts.sizes());
  check_float(op, "zd", zd, {experts.numel(), -1});
  check_float(op, "B", B, {-1, -1, zd.size(1)});
  check_float(op, "weights", weights, {experts.size(0), experts.size(1)});
  check_routing(op, experts, order, offsets, experts.size(0), B.size(0));
}

// zd (S, R), B (E, H, R), weights (T, K) float. Returns y (T, H) fp32: s sum_k w_j B_e zd_j.
at::Tensor lora_expand_combine_cuda(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                    double scale) {
  check_cuda("lora_expand_combine", {{"zd", &zd}, {"B", &B}, {"weights", &weights}, {"experts", &experts},
                                     {"order", &order}, {"offsets", &offsets}});
  check_lora_expand_combine(zd, B, weights, experts, order, offsets);
  const c10::cuda::CUDAGuard device_guard(zd.device());
  at::Tensor y = at::empty({experts.size(0), B.size(1)}, zd.options().dtype(at::kFloat));
  lora_expand_combine_forward_launch(float_inner(zd),
                                     check_32bit_span("lora_expand_combine", "B", unit_inner_stride(B)),
                                     float_contiguous(weights),
                                     experts.to(at::kLong).contiguous(), scale, y, c10::cuda::getCurrentCUDAStream());
  return y;
}

at::Tensor lora_expand_combine_meta(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                    double /*scale*/) {
  check_lora_expand_combine(zd, B, weights, experts, order, offsets);
  return at::empty({experts.size(0), B.size(1)}, zd.options().dtype(at::kFloat));
}

void check_lora_expand_combine_backward(const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B,
                                        const at::Tensor& weights, const at::Tensor& experts,
                                        const at::Tensor& order, const at::Tensor& offsets) {
  check_lora_expand_combine(zd, B, weights, experts, order, offsets);
  check_float("lora_expand_combine_backward", "grad_y", grad_y, {experts.size(0), B.size(1)});
}

// Returns (dzd like zd, dB like B, dweights like weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_combine_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets, double scale) {
  check_cuda("lora_expand_combine_backward", {{"grad_y", &grad_y}, {"zd", &zd}, {"B", &B}, {"weights", &weights},
                                              {"experts", &experts}, {"order", &order}, {"offsets", &offsets}});
  check_lora_expand_combine_backward(grad_y, zd, B, weights, experts, order, offsets);
  const c10::cuda::CUDAGuard device_guard(zd.device());
  const auto f32 = zd.options().dtype(at::kFloat);
  at::Tensor dzd = at::empty({zd.size(0), zd.size(1)}, f32);
  at::Tensor dB = at::empty({B.size(0), B.size(1), B.size(2)}, f32);
  at::Tensor dweights = at::empty({weights.size(0), weights.size(1)}, f32);
  const bool B_as_is = B.scalar_type() == grad_y.scalar_type() || grad_y.scalar_type() == at::kFloat;
  lora_expand_combine_backward_launch(unit_inner_stride(grad_y), float_inner(zd),
                                      check_32bit_span("lora_expand_combine_backward", "B",
                                                       B_as_is ? unit_inner_stride(B) : float_inner(B)),
                                      float_contiguous(weights), experts.to(at::kLong).contiguous(),
                                      order.contiguous(), offsets.contiguous(), scale, dzd, dB, dweights,
                                      c10::cuda::getCurrentCUDAStream());
  return {like_dtype(dzd, zd), like_dtype(dB, B), like_dtype(dweights, weights)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_combine_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets, double /*scale*/) {
  check_lora_expand_combine_backward(grad_y, zd, B, weights, experts, order, offsets);
  return {at::empty({zd.size(0), zd.size(1)}, zd.options()), at::empty({B.size(0), B.size(1), B.size(2)}, B.options()),
          at::empty({weights.size(0), weights.size(1)}, weights.options())};
}

// ----- expand_act_combine -----

int activation_code(const char* op, const std::string& name) {
  // The order of mixlora_kernels/ops/_common.py::ACTIVATIONS and of common.cuh::Activation.
  static const char* const kNames[] = {"silu", "gelu", "gelu_tanh", "relu"};
  for (int code = 0; code < 4; ++code) {
    if (name == kNames[code]) {
      return code;
    }
  }
  TORCH_CHECK(false, op, ": activation must be one of ('silu', 'gelu', 'gelu_tanh', 'relu'), got '", name, "'");
}

void check_expand_act_combine(const char* op, const at::Tensor& G, const std::optional<at::Tensor>& U,
                              const at::Tensor& zg, const at::Tensor& Bg, const at::Tensor& zu, const at::Tensor& Bu,
                              const at::Tensor& weights, const at::Tensor& experts, const at::Tensor& order,
                              const at::Tensor& offsets, const at::Tensor& Ad, const std::string& activation_name,
                              double dropout_p) {
  check_float(op, "G", G, {-1, -1});
  const int64_t T = G.size(0);
  const int64_t I = G.size(1);
  if (U.has_value()) {
    check_float(op, "U", *U, {T, I});
    TORCH_CHECK(U->scalar_type() == G.scalar_type(), op, ": U must have G's dtype ", G.scalar_type(), ", got ",
                U->scalar_type());
  }
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == T, op, ": experts must have shape (T, K) = (", T,
              ", *), got ", experts.sizes());
  const int64_t S = experts.numel();
  check_float(op, "zg", zg, {S, -1});
  check_float(op, "Bg", Bg, {-1, I, zg.size(1)});
  const int64_t E = Bg.size(0);
  check_float(op, "zu", zu, {S, -1});
  check_float(op, "Bu", Bu, {E, I, zu.size(1)});
  TORCH_CHECK(U.has_value() || zu.size(1) == 0, op, ": an up LoRA (zu, Bu with R > 0) needs U; got U=None");
  check_float(op, "Ad", Ad, {E, -1, I});
  check_float(op, "weights", weights, {T, experts.size(1)});
  check_routing(op, experts, order, offsets, T, E);
  activation_code(op, activation_name);
  check_dropout(op, dropout_p);
}

ExpandActCombineInputs prepare_expand_act_combine(const at::Tensor& G, const std::optional<at::Tensor>& U,
                                                  const at::Tensor& zg, const at::Tensor& Bg, const at::Tensor& zu,
                                                  const at::Tensor& Bu, const at::Tensor& weights,
                                                  const at::Tensor& experts, const at::Tensor& order,
                                                  const at::Tensor& offsets, const at::Tensor& Ad, double scale,
                                                  const std::string& activation_name, double dropout_p,
                                                  int64_t seed) {
  ExpandActCombineInputs in;
  in.G = unit_inner_stride(G);
  if (U.has_value()) {
    in.U = unit_inner_stride(*U);
  }
  // The kernels read weights in G's dtype as they are; only weights of another dtype become fp32 copies.
  const bool as_is = expand_act_combine_reads_weights_as_is(G, Bg, Bu, Ad);
  const auto weight = [as_is](const at::Tensor& t) { return as_is ? unit_inner_stride(t) : float_inner(t); };
  in.zg = float_inner(zg);
  in.Bg = weight(Bg);
  in.zu = float_inner(zu);
  in.Bu = weight(Bu);
  in.weights = float_contiguous(weights);
  in.experts = experts.to(at::kLong).contiguous();
  in.order = order.contiguous();
  in.offsets = offsets.contiguous();
  in.Ad = weight(Ad);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"Bg", &in.Bg}, {"Bu", &in.Bu}, {"Ad", &in.Ad}}) {
    check_32bit_span("expand_act_combine", name, *t);
  }
  in.scale = scale;
  in.activation = activation_code("expand_act_combine", activation_name);
  in.dropout_p = dropout_p;
  in.seed = seed;
  return in;
}

// G, U (T, I); zg, zu (S, R*); Bg, Bu (E, I, R*); weights (T, K); Ad (E, Rd, I). Returns (hbar (T, I) in G's
// dtype, zd (S, Rd) fp32).
std::tuple<at::Tensor, at::Tensor> expand_act_combine_cuda(
    const at::Tensor& G, const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
    const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights, const at::Tensor& experts,
    const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& Ad, double scale,
    std::string activation_name, double dropout_p, int64_t seed) {
  const at::Tensor& U_ref = U.has_value() ? *U : G;
  check_cuda("expand_act_combine", {{"G", &G}, {U.has_value() ? "U" : "G", &U_ref}, {"zg", &zg}, {"Bg", &Bg},
                                    {"zu", &zu}, {"Bu", &Bu}, {"weights", &weights}, {"experts", &experts},
                                    {"order", &order}, {"offsets", &offsets}, {"Ad", &Ad}});
  check_expand_act_combine("expand_act_combine", G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
                           activation_name, dropout_p);
  const c10::cuda::CUDAGuard device_guard(G.device());
  const ExpandActCombineInputs in = prepare_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets,
                                                               Ad, scale, activation_name, dropout_p, seed);
  at::Tensor hbar = at::empty({G.size(0), G.size(1)}, G.options());
  at::Tensor zd = at::empty({experts.numel(), Ad.size(1)}, G.options().dtype(at::kFloat));
  expand_act_combine_forward_launch(in, hbar, zd, c10::cuda::getCurrentCUDAStream());
  return {hbar, zd};
}

std::tuple<at::Tensor, at::Tensor> expand_act_combine_meta(
    const at::Tensor& G, const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
    const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights, const at::Tensor& experts,
    const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& Ad, double /*scale*/,
    std::string activation_name, double dropout_p, int64_t /*seed*/) {
  check_expand_act_combine("expand_act_combine", G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
                           activation_name, dropout_p);
  return {at::empty({G.size(0), G.size(1)}, G.options()),
          at::empty({experts.numel(), Ad.size(1)}, G.options().dtype(at::kFloat))};
}

void check_expand_act_combine_backward(const at::Tensor& grad_hbar, const at::Tensor& grad_zd, const at::Tensor& G,
                                       const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
                                       const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                                       const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                       const at::Tensor& Ad, const std::string& activation_name, double dropout_p) {
  const char* op = "expand_act_combine_backward";
  check_expand_act_combine(op, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad, activation_name,
                           dropout_p);
  check_float(op, "grad_hbar", grad_hbar, {G.size(0), G.size(1)});
  TORCH_CHECK(grad_hbar.scalar_type() == G.scalar_type(), op, ": grad_hbar must have G's dtype ", G.scalar_type(),
              " (hbar's dtype), got ", grad_hbar.scalar_type());
  check_float(op, "grad_zd", grad_zd, {experts.numel(), Ad.size(1)});
}

// Returns (dG, dU, dzg, dBg, dzu, dBu, dweights, dAd), each like its input; dU is empty (numel 0) when U is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expand_act_combine_backward_cuda(const at::Tensor& grad_hbar, const at::Tensor& grad_zd, const at::Tensor& G,
                                 const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
                                 const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                                 const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                 const at::Tensor& Ad, double scale, std::string activation_name, double dropout_p,
                                 int64_t seed) {
  const at::Tensor& U_ref = U.has_value() ? *U : G;
  check_cuda("expand_act_combine_backward",
             {{"grad_hbar", &grad_hbar}, {"grad_zd", &grad_zd}, {"G", &G}, {U.has_value() ? "U" : "G", &U_ref},
              {"zg", &zg}, {"Bg", &Bg}, {"zu", &zu}, {"Bu", &Bu}, {"weights", &weights}, {"experts", &experts},
              {"order", &order}, {"offsets", &offsets}, {"Ad", &Ad}});
  check_expand_act_combine_backward(grad_hbar, grad_zd, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
                                    activation_name, dropout_p);
  const c10::cuda::CUDAGuard device_guard(G.device());
  const ExpandActCombineInputs in = prepare_expand_act_combine(G, U, zg, Bg, zu, Bu, weights, experts, order, offsets,
                                                               Ad, scale, activation_name, dropout_p, seed);
  const auto f32 = G.options().dtype(at::kFloat);
  at::Tensor dG = at::empty({G.size(0), G.size(1)}, G.options());
  at::Tensor dU = U.has_value() ? at::empty({G.size(0), G.size(1)}, G.options()) : at::empty({0}, G.options());
  at::Tensor dzg = at::empty({zg.size(0), zg.size(1)}, f32);
  at::Tensor dBg = at::empty({Bg.size(0), Bg.size(1), Bg.size(2)}, f32);
  at::Tensor dzu = at::empty({zu.size(0), zu.size(1)}, f32);
  at::Tensor dBu = at::empty({Bu.size(0), Bu.size(1), Bu.size(2)}, f32);
  at::Tensor dweights = at::empty({weights.size(0), weights.size(1)}, f32);
  at::Tensor dAd = at::empty({Ad.size(0), Ad.size(1), Ad.size(2)}, f32);
  expand_act_combine_backward_launch(unit_inner_stride(grad_hbar), float_inner(grad_zd), in, dG, dU, dzg, dBg, dzu,
                                     dBu, dweights, dAd, c10::cuda::getCurrentCUDAStream());
  return {dG, dU, like_dtype(dzg, zg), like_dtype(dBg, Bg), like_dtype(dzu, zu), like_dtype(dBu, Bu),
          like_dtype(dweights, weights), like_dtype(dAd, Ad)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expand_act_combine_backward_meta(const at::Tensor& grad_hbar, const at::Tensor& grad_zd, const at::Tensor& G,
                                 const std::optional<at::Tensor>& U, const at::Tensor& zg, const at::Tensor& Bg,
                                 const at::Tensor& zu, const at::Tensor& Bu, const at::Tensor& weights,
                                 const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                 const at::Tensor& Ad, double /*scale*/, std::string activation_name,
                                 double dropout_p, int64_t /*seed*/) {
  check_expand_act_combine_backward(grad_hbar, grad_zd, G, U, zg, Bg, zu, Bu, weights, experts, order, offsets, Ad,
                                    activation_name, dropout_p);
  auto like = [](const at::Tensor& t) { return at::empty(t.sizes(), t.options()); };
  return {like(G), U.has_value() ? like(*U) : at::empty({0}, G.options()), like(zg), like(Bg), like(zu), like(Bu),
          like(weights), like(Ad)};
}

// ----- route -----

void check_route(const at::Tensor& logits, int64_t top_k) {
  check_float("route", "logits", logits, {-1, -1});
  TORCH_CHECK(top_k >= 1 && top_k <= logits.size(1), "route: top_k must be in [1, E=", logits.size(1), "], got ",
              top_k);
}

// logits (T, E) float. Returns (weights (T, K) fp32, experts (T, K) int64), K = top_k.
std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t top_k) {
  check_cuda("route", {{"logits", &logits}});
  check_route(logits, top_k);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor weights = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kFloat));
  at::Tensor experts = at::empty({logits.size(0), top_k}, logits.options().dtype(at::kLong));
  route_forward_launch(logits.contiguous(), top_k, weights, experts, c10::cuda::getCurrentCUDAStream());
  return {weights, experts};
}

std::tuple<at::Tensor, at::Tensor> route_meta(const at::Tensor& logits, int64_t top_k) {
  check_route(logits, top_k);
  return {at::empty({logits.size(0), top_k}, logits.options().dtype(at::kFloat)),
          at::empty({logits.size(0), top_k}, logits.options().dtype(at::kLong))};
}

void check_route_backward(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& experts,
                          int64_t num_experts) {
  const char* op = "route_backward";
  check_float(op, "weights", weights, {-1, -1});
  check_float(op, "grad_weights", grad_weights, {weights.size(0), weights.size(1)});
  TORCH_CHECK(experts.scalar_type() == at::kInt || experts.scalar_type() == at::kLong, op,
              ": experts must be int32 or int64, got ", experts.scalar_type());
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == weights.size(0) && experts.size(1) == weights.size(1), op,
              ": experts must have weights' shape (T, K) = ", weights.sizes(), ", got ", experts.sizes());
  TORCH_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
}

// Returns grad_logits (T, E) in the promoted dtype of grad_weights and weights (as the reference computes it).
at::Tensor route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& experts,
                               int64_t num_experts) {
  check_cuda("route_backward", {{"grad_weights", &grad_weights}, {"weights", &weights}, {"experts", &experts}});
  check_route_backward(grad_weights, weights, experts, num_experts);
  const c10::cuda::CUDAGuard device_guard(weights.device());
  at::Tensor grad_logits = at::empty({weights.size(0), num_experts},
                                     weights.options().dtype(at::result_type(grad_weights, weights)));
  route_backward_launch(float_contiguous(grad_weights), float_contiguous(weights), experts.to(at::kLong).contiguous(),
                        grad_logits, c10::cuda::getCurrentCUDAStream());
  return grad_logits;
}

at::Tensor route_backward_meta(const at::Tensor& grad_weights, const at::Tensor& weights, const at::Tensor& experts,
                               int64_t num_experts) {
  check_route_backward(grad_weights, weights, experts, num_experts);
  return at::empty({weights.size(0), num_experts}, weights.options().dtype(at::result_type(grad_weights, weights)));
}

// ----- router_logits -----

void check_router_logits(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* grad) {
  const char* op = grad ? "router_logits_backward" : "router_logits";
  check_float(op, "x", x, {-1, -1});
  check_float(op, "weight", weight, {-1, x.size(1)});
  if (grad) {
    check_float(op, "grad", *grad, {x.size(0), weight.size(0)});
  }
  TORCH_CHECK(x.size(0) <= kRouterMaxTokens, op, ": T = ", x.size(0), " rows exceed the ", kRouterMaxTokens,
              " the kernels' grids support");
}

// x (T, H) float, weight (E, H) float (read as an fp32 copy unless fp32). Returns logits (T, E) fp32.
at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda("router_logits", {{"x", &x}, {"weight", &weight}});
  check_router_logits(x, weight, nullptr);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor logits = at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
  router_logits_forward_launch(unit_inner_stride(x), float_inner(weight), logits, c10::cuda::getCurrentCUDAStream());
  return logits;
}

at::Tensor router_logits_meta(const at::Tensor& x, const at::Tensor& weight) {
  check_router_logits(x, weight, nullptr);
  return at::empty({x.size(0), weight.size(0)}, x.options().dtype(at::kFloat));
}

// grad (T, E) float. Returns (dx (T, H) like x, dW (E, H) like weight).
std::tuple<at::Tensor, at::Tensor> router_logits_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight) {
  check_cuda("router_logits_backward", {{"grad", &grad}, {"x", &x}, {"weight", &weight}});
  check_router_logits(x, weight, &grad);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor dx = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor dw = at::empty({weight.size(0), weight.size(1)}, weight.options().dtype(at::kFloat));
  router_logits_backward_launch(float_contiguous(grad), unit_inner_stride(x), float_inner(weight), dx, dw,
                                c10::cuda::getCurrentCUDAStream());
  return {dx, like_dtype(dw, weight)};
}

std::tuple<at::Tensor, at::Tensor> router_logits_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight) {
  check_router_logits(x, weight, &grad);
  return {at::empty({x.size(0), x.size(1)}, x.options()),
          at::empty({weight.size(0), weight.size(1)}, weight.options())};
}

}  // namespace
}  // namespace mixlora

// Schemas mirror the mixlora:: ops (mixlora_kernels/ops/<op>.py) argument for argument, so that the Python registry
// can install torch.ops.mixlora_cuda.<op> as the CUDA kernel of mixlora::<op>.
TORCH_LIBRARY(mixlora_cuda, m) {
  m.def("sort_slots(Tensor experts, int num_experts) -> (Tensor order, Tensor offsets)");
  m.def("lora_shrink(Tensor x, Tensor A, Tensor experts, Tensor order, Tensor offsets, float dropout_p, int seed) "
        "-> Tensor");
  m.def("lora_shrink_backward(Tensor grad_z, Tensor x, Tensor A, Tensor experts, Tensor order, Tensor offsets, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_expand_combine(Tensor zd, Tensor B, Tensor weights, Tensor experts, Tensor order, Tensor offsets, "
        "float scale) -> Tensor");
  m.def("lora_expand_combine_backward(Tensor grad_y, Tensor zd, Tensor B, Tensor weights, Tensor experts, "
        "Tensor order, Tensor offsets, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("expand_act_combine(Tensor G, Tensor? U, Tensor zg, Tensor Bg, Tensor zu, Tensor Bu, Tensor weights, "
        "Tensor experts, Tensor order, Tensor offsets, Tensor Ad, float scale, str activation_name, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("expand_act_combine_backward(Tensor grad_hbar, Tensor grad_zd, Tensor G, Tensor? U, Tensor zg, Tensor Bg, "
        "Tensor zu, Tensor Bu, Tensor weights, Tensor experts, Tensor order, Tensor offsets, Tensor Ad, float scale, "
        "str activation_name, float dropout_p, int seed) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("route(Tensor logits, int top_k) -> (Tensor, Tensor)");
  m.def("route_backward(Tensor grad_weights, Tensor weights, Tensor experts, int num_experts) -> Tensor");
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor");
  m.def("router_logits_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mixlora_cuda, CUDA, m) {
  m.impl("sort_slots", &mixlora::sort_slots_cuda);
  m.impl("lora_shrink", &mixlora::lora_shrink_cuda);
  m.impl("lora_shrink_backward", &mixlora::lora_shrink_backward_cuda);
  m.impl("lora_expand_combine", &mixlora::lora_expand_combine_cuda);
  m.impl("lora_expand_combine_backward", &mixlora::lora_expand_combine_backward_cuda);
  m.impl("expand_act_combine", &mixlora::expand_act_combine_cuda);
  m.impl("expand_act_combine_backward", &mixlora::expand_act_combine_backward_cuda);
  m.impl("route", &mixlora::route_cuda);
  m.impl("route_backward", &mixlora::route_backward_cuda);
  m.impl("router_logits", &mixlora::router_logits_cuda);
  m.impl("router_logits_backward", &mixlora::router_logits_backward_cuda);
}

TORCH_LIBRARY_IMPL(mixlora_cuda, Meta, m) {
  m.impl("sort_slots", &mixlora::sort_slots_meta);
  m.impl("lora_shrink", &mixlora::lora_shrink_meta);
  m.impl("lora_shrink_backward", &mixlora::lora_shrink_backward_meta);
  m.impl("lora_expand_combine", &mixlora::lora_expand_combine_meta);
  m.impl("lora_expand_combine_backward", &mixlora::lora_expand_combine_backward_meta);
  m.impl("expand_act_combine", &mixlora::expand_act_combine_meta);
  m.impl("expand_act_combine_backward", &mixlora::expand_act_combine_backward_meta);
  m.impl("route", &mixlora::route_meta);
  m.impl("route_backward", &mixlora::route_backward_meta);
  m.impl("router_logits", &mixlora::router_logits_meta);
  m.impl("router_logits_backward", &mixlora::router_logits_backward_meta);
}

// Empty: importing the module only has to load the library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
