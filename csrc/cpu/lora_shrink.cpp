// mixlora::lora_shrink and its backward on CPU tensors (the semantics: mixlora_kernels/ops/lora_shrink.py).
//
//   forward   z_j = A_e drop_j(x_t): one task per expert tile gathers its tokens' rows of x (masked) and multiplies
//             them by A_eᵀ (a GEMM over all of H: no partial sums); the rows land in slot order.
//   backward  one task per column block of H (cpu_common.h: column_blocks) walks every tile in expert-sorted order:
//             d_rows = (dz / (1-p)) A_e[:, cols] masked and added into dx_t (the block's task is the only writer of
//             its columns of dx), and dA_e[:, cols] += (dz / (1-p))ᵀ drop(x rows). No partial sums at all: the bits
//             do not depend on the thread count.
// Only the slots' GEMMs (S·R·H each way), not the dense all-expert GEMMs of the pure-torch kernels (E/K times that).

#include <optional>
#include <tuple>

#include "cpu_common.h"

namespace mixlora_cpu {
namespace {

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts,
                  const at::Tensor& order, const at::Tensor& offsets) {
  check_cpu_float(x, op, "x");
  check_cpu_float(A, op, "A");
  TORCH_CHECK(x.dim() == 2 && A.dim() == 3 && A.size(2) == x.size(1), "mixlora_cpu::", op,
              ": x must be (T, H) and A (E, R, H)");
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == x.size(0), "mixlora_cpu::", op, ": experts must be (T, K)");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == experts.numel(), "mixlora_cpu::", op,
              ": order must be int64 (S,)");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == A.size(0) + 1, "mixlora_cpu::", op,
              ": offsets must be int64 (E+1,)");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), "mixlora_cpu::", op, ": H too large");
}

}  // namespace

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& experts,
                           const at::Tensor& order, const at::Tensor& offsets, double dropout_p, int64_t seed) {
  check_inputs("lora_shrink", x, A, experts, order, offsets);
  const int64_t H = x.size(1), R = A.size(1);
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, nullptr);
  const int64_t S = routing.S;
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor z = at::zeros({S, R}, opts);
  if (R == 0 || S == 0 || H == 0) return z;
  const Dropout drop(dropout_p, seed);
  const at::ScalarType in_dtype = loop_dtype({&x});
  const at::Tensor xin = x.to(in_dtype).contiguous();
  const at::Tensor A_f = f32(A);
  const float* A_p = A_f.data_ptr<float>();
  at::Tensor z_sorted = at::empty({S, R}, opts);
  float* zs_p = z_sorted.data_ptr<float>();
  const int64_t ntiles = static_cast<int64_t>(routing.tiles.size());

  dispatch_bool(drop.on, [&](auto MASK) {
    dispatch_input(in_dtype, [&](auto in_tag) {
      using In = decltype(in_tag);
      const In* x_p = data_as<In>(xin);
      at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> rows_buf(kTileRows * H);
        for (int64_t ti = t0; ti < t1; ++ti) {
          const Tile& tile = routing.tiles[ti];
          const int64_t rows = tile.end - tile.start, r0 = tile.start;
          gather_rows<MASK, false, In>(rows, H, 0, H, x_p, routing.tokens.data() + r0, routing.order + r0, nullptr,
                                       drop.seed, drop.threshold, rows_buf.data());
          // z rows (rows x R) = drop(x rows) (rows x H) A_eᵀ, times 1/(1-p)
          gemm(false, true, rows, R, H, drop.inv_keep, rows_buf.data(), H, A_p + tile.expert * R * H, H, 0.0f,
               zs_p + r0 * R, R);
        }
      });
    });
  });
  z.index_copy_(0, order, z_sorted);
  return z;
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                                            const at::Tensor& A, const at::Tensor& experts,
                                                            const at::Tensor& order, const at::Tensor& offsets,
                                                            double dropout_p, int64_t seed) {
  check_inputs("lora_shrink_backward", x, A, experts, order, offsets);
  check_cpu_float(grad_z, "lora_shrink_backward", "grad_z");
  TORCH_CHECK(grad_z.dim() == 2 && grad_z.size(0) == experts.numel() && grad_z.size(1) == A.size(1),
              "mixlora_cpu::lora_shrink_backward: grad_z must be (S, R)");
  const int64_t T = x.size(0), H = x.size(1), R = A.size(1);
  const SortedRouting routing(order.contiguous(), offsets.contiguous(), experts, nullptr);
  const int64_t S = routing.S;
  if (R == 0 || S == 0 || H == 0) return {at::zeros_like(x), at::zeros_like(A)};
  const Dropout drop(dropout_p, seed);
  const auto opts = x.options().dtype(at::kFloat);
  const at::ScalarType in_dtype = loop_dtype({&x});
  const at::Tensor xin = x.to(in_dtype).contiguous();
  const at::Tensor A_f = f32(A);
  const at::Tensor gz_s = sorted_rows(grad_z, order, drop.inv_keep);  // the mask's 1/(1-p), on the rank-R side
  at::Tensor dx = at::empty({T, H}, opts);
  at::Tensor dA = at::zeros({A.size(0), R, H}, opts);
  const float *A_p = A_f.data_ptr<float>(), *gz_p = gz_s.data_ptr<float>();
  float *dx_p = dx.data_ptr<float>(), *dA_p = dA.data_ptr<float>();
  const std::vector<int64_t> blocks = column_blocks(H);
  const int64_t nblk = static_cast<int64_t>(blocks.size()) - 1;

  dispatch_bool(drop.on, [&](auto MASK) {
    dispatch_input(in_dtype, [&](auto in_tag) {
      using In = decltype(in_tag);
      const In* x_p = data_as<In>(xin);
      at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
        int64_t wmax = 0;
        for (int64_t c = b0; c < b1; ++c) wmax = std::max(wmax, blocks[c + 1] - blocks[c]);
        std::vector<float> scratch(2 * kTileRows * wmax);
        float* dbuf = scratch.data();
        float* xbuf = dbuf + kTileRows * wmax;
        for (int64_t c = b0; c < b1; ++c) {
          const int64_t c0 = blocks[c], W = blocks[c + 1] - c0;
          zero_columns(dx_p, T, H, c0, W);
          for (const Tile& tile : routing.tiles) {
            const int64_t rows = tile.end - tile.start, r0 = tile.start;
            const int64_t* tokens = routing.tokens.data() + r0;
            const int64_t* slots = routing.order + r0;
            const float* A_e = A_p + tile.expert * R * H + c0;  // A_e[:, cols] (R x W, ld H)
            // d_rows (rows x W) = dz' (rows x R) A_e[:, cols]; dx_t[cols] += drop(d_rows)
            gemm(false, false, rows, W, R, 1.0f, gz_p + r0 * R, R, A_e, H, 0.0f, dbuf, W);
            add_rows<MASK, false>(rows, W, c0, H, dbuf, tokens, slots, nullptr, drop.seed, drop.threshold, dx_p);
            // dA_e[:, cols] += dz'ᵀ (R x rows) drop(x rows[cols]) (rows x W)
            gather_rows<MASK, false, In>(rows, W, c0, H, x_p, tokens, slots, nullptr, drop.seed, drop.threshold,
                                         xbuf);
            gemm(true, false, R, W, rows, 1.0f, gz_p + r0 * R, R, xbuf, W, 1.0f, dA_p + tile.expert * R * H + c0, H);
          }
        }
      });
    });
  });
  return {like(dx, x), like(dA, A)};
}

}  // namespace mixlora_cpu
