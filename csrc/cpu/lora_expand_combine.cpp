// mixlora::lora_expand_combine and its backward on CPU tensors (the semantics:
// mixlora_kernels/ops/lora_expand_combine.py).
//
//   forward   y_t = s Σ_k w_j B_e zd_j: one task per column block of H walks every expert tile in sorted order,
//             y_rows = zd_rows B_e[cols, :]ᵀ (a GEMM), y_t[cols] += w_j y_j (the task is the only writer of its
//             columns of y), then y[:, cols] *= s.
//   backward  q_j = s B_eᵀ dy_t needs all of H: one task per expert tile gathers its tokens' rows of dy and multiplies
//             them by B_e (dzd_j = w_j q_j, dw_j = ⟨q_j, zd_j⟩, rows in slot order); then one task per column block
//             of H sums dB_e[cols, :] = s Σ_j (w_j dy_t[cols]) zd_jᵀ over the expert's tiles in sorted order.
// No partial sums across tasks: the bits do not depend on the thread count. Only the slots' GEMMs (S·R·H), not the
// dense ones over all E·R expert columns of the pure-torch kernels.

#include <optional>
#include <tuple>

#include "cpu_common.h"

namespace mixlora_cpu {
namespace {

void check_inputs(const char* op, const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                  const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets) {
  check_cpu_float(zd, op, "zd");
  check_cpu_float(B, op, "B");
  check_cpu_float(weights, op, "weights");
  TORCH_CHECK(experts.dim() == 2 && zd.dim() == 2 && zd.size(0) == experts.numel(), "mixlora_cpu::", op,
              ": zd must be (S, R) and experts (T, K)");
  TORCH_CHECK(B.dim() == 3 && B.size(2) == zd.size(1), "mixlora_cpu::", op, ": B must be (E, H, R)");
  TORCH_CHECK(weights.sizes() == experts.sizes(), "mixlora_cpu::", op, ": weights must be (T, K)");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == experts.numel(), "mixlora_cpu::", op,
              ": order must be int64 (S,)");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == B.size(0) + 1, "mixlora_cpu::", op,
              ": offsets must be int64 (E+1,)");
  TORCH_CHECK(B.size(1) < (int64_t{1} << 31), "mixlora_cpu::", op, ": H too large");
}

}  // namespace

at::Tensor lora_expand_combine_cpu(const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
                                   const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets,
                                   double scale) {
  check_inputs("lora_expand_combine", zd, B, weights, experts, order, offsets);
  const int64_t T = experts.size(0), H = B.size(1), R = B.size(2);
  const auto opts = zd.options().dtype(at::kFloat);
  if (R == 0 || T == 0 || H == 0) return at::zeros({T, H}, opts);
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, &weights);
  const at::Tensor zd_s = sorted_rows(zd, order, 1.0);
  const at::Tensor B_f = f32(B);
  at::Tensor y = at::empty({T, H}, opts);
  const float *zd_p = zd_s.data_ptr<float>(), *B_p = B_f.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const std::vector<int64_t> blocks = column_blocks(H);
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;

  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    int64_t wmax = 0;
    for (int64_t c = b0; c < b1; ++c) wmax = std::max(wmax, blocks[c + 1] - blocks[c]);
    std::vector<float> ybuf(kTileRows * wmax);
    for (int64_t c = b0; c < b1; ++c) {
      const int64_t c0 = blocks[c], W = blocks[c + 1] - c0;
      zero_columns(y_p, T, H, c0, W);
      for (const Tile& tile : routing.tiles) {
        const int64_t rows = tile.end - tile.start, r0 = tile.start;
        // y_rows (rows x W) = zd_rows (rows x R) B_e[cols, :]ᵀ; y_t[cols] += w_j y_j
        gemm(false, true, rows, W, R, 1.0f, zd_p + r0 * R, R, B_p + (tile.expert * H + c0) * R, R, 0.0f,
             ybuf.data(), W);
        add_rows<false, true>(rows, W, c0, H, ybuf.data(), routing.tokens.data() + r0, routing.order + r0,
                              routing.weights.data() + r0, 0, 0, y_p);
      }
      for (int64_t t = 0; t < T; ++t) {
        float* row = y_p + t * H + c0;
        for (int64_t i = 0; i < W; ++i) row[i] *= s;
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_combine_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& zd, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& order, const at::Tensor& offsets, double scale) {
  check_inputs("lora_expand_combine_backward", zd, B, weights, experts, order, offsets);
  check_cpu_float(grad_y, "lora_expand_combine_backward", "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == experts.size(0) && grad_y.size(1) == B.size(1),
              "mixlora_cpu::lora_expand_combine_backward: grad_y must be (T, H)");
  const int64_t T = experts.size(0), H = B.size(1), R = B.size(2);
  if (R == 0 || T == 0 || H == 0) return {at::zeros_like(zd), at::zeros_like(B), at::zeros_like(weights)};
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, &weights);
  const int64_t S = routing.S;
  const auto opts = zd.options().dtype(at::kFloat);
  const at::ScalarType in_dtype = loop_dtype({&grad_y});
  const at::Tensor gy = grad_y.to(in_dtype).contiguous();
  const at::Tensor zd_s = sorted_rows(zd, order, 1.0);
  const at::Tensor B_f = f32(B);
  at::Tensor dzd_s = at::empty({S, R}, opts), dw_s = at::empty({S}, opts);
  at::Tensor dB = at::zeros({B.size(0), H, R}, opts);
  const float *zd_p = zd_s.data_ptr<float>(), *B_p = B_f.data_ptr<float>();
  float *dzd_p = dzd_s.data_ptr<float>(), *dw_p = dw_s.data_ptr<float>(), *dB_p = dB.data_ptr<float>();
  const float* w_p = routing.weights.data();
  const float s = static_cast<float>(scale);
  const std::vector<int64_t> blocks = column_blocks(H);
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;
  const int64_t ntiles = static_cast<int64_t>(routing.tiles.size());

  dispatch_input(in_dtype, [&](auto in_tag) {
    using In = decltype(in_tag);
    const In* gy_p = data_as<In>(gy);
    // q, dzd, dw per tile (all of H).
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> rows_buf(kTileRows * H), q(kTileRows * R);
      for (int64_t ti = t0; ti < t1; ++ti) {
        const Tile& tile = routing.tiles[ti];
        const int64_t rows = tile.end - tile.start, r0 = tile.start;
        gather_rows<false, false, In>(rows, H, 0, H, gy_p, routing.tokens.data() + r0, routing.order + r0, nullptr,
                                      0, 0, rows_buf.data());
        // q (rows x R) = s dy_rows (rows x H) B_e (H x R)
        gemm(false, false, rows, R, H, s, rows_buf.data(), H, B_p + tile.expert * H * R, R, 0.0f, q.data(), R);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = r0 + r;
          const float* qr = q.data() + r * R;
          const float* zr = zd_p + p * R;
          float dw = 0.0f;
          for (int64_t k = 0; k < R; ++k) {
            dzd_p[p * R + k] = w_p[p] * qr[k];
            dw += qr[k] * zr[k];
          }
          dw_p[p] = dw;
        }
      }
    });
    // dB_e[cols, :] = s Σ_j (w_j dy_t[cols]) zd_jᵀ, the expert's tiles in sorted order.
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      int64_t wmax = 0;
      for (int64_t c = b0; c < b1; ++c) wmax = std::max(wmax, blocks[c + 1] - blocks[c]);
      std::vector<float> rows_buf(kTileRows * wmax);
      for (int64_t c = b0; c < b1; ++c) {
        const int64_t c0 = blocks[c], W = blocks[c + 1] - c0;
        for (const Tile& tile : routing.tiles) {
          const int64_t rows = tile.end - tile.start, r0 = tile.start;
          gather_rows<false, true, In>(rows, W, c0, H, gy_p, routing.tokens.data() + r0, routing.order + r0,
                                       w_p + r0, 0, 0, rows_buf.data());
          gemm(true, false, W, R, rows, s, rows_buf.data(), W, zd_p + r0 * R, R, 1.0f,
               dB_p + (tile.expert * H + c0) * R, R);
        }
      }
    });
  });
  at::Tensor dzd = at::zeros({S, R}, opts).index_copy_(0, order, dzd_s);
  at::Tensor dw = at::zeros({S}, opts).index_copy_(0, order, dw_s);
  return {like(dzd, zd), like(dB, B), like(dw.view(weights.sizes()), weights)};
}

}  // namespace mixlora_cpu
