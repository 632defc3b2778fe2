// The device code of route: kernels, their parameter structs and device helpers. The algorithm and the
// launch configuration are described in route.cu, which includes this file and launches the kernels.
// Free of torch and of host launch code, so that tests/cuda_cpu can compile the same text for the CPU.
// Included by one translation unit per library, hence the unnamed namespace.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

#include "common.cuh"

namespace mixlora {
namespace {

constexpr int kRouteBlock = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteBlock)
route_fwd_kernel(const scalar_t* __restrict__ logits, int64_t T, int64_t E, int64_t K, float* __restrict__ weights,
                 int64_t* __restrict__ experts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) {
    return;
  }
  const scalar_t* row = logits + t * E;
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    mx = fmaxf(mx, static_cast<float>(row[e]));
  }
  float denom = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    denom += expf(static_cast<float>(row[e]) - mx);
  }
  // k-th pick: the first expert strictly after the previous pick in the order (p descending, index ascending),
  // where NaN ranks above every number, as in the reference's sort of nan_to_num(p, nan=inf). A NaN logit makes
  // the whole row NaN (denom is NaN; fmaxf skips NaN), so such a row gets experts 0..K-1 with NaN weights: ids
  // stay valid and distinct for any input.
  float prev_key = INFINITY;
  int64_t prev_e = -1;
  float total = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float best_key = 0.0f;
    float best_p = 0.0f;
    int64_t best_e = -1;
    for (int64_t e = 0; e < E; ++e) {
      const float p = expf(static_cast<float>(row[e]) - mx) / denom;
      const float key = isnan(p) ? INFINITY : p;
      const bool after_prev = key < prev_key || (key == prev_key && e > prev_e);
      if (after_prev && (best_e < 0 || key > best_key)) {
        best_key = key;
        best_p = p;
        best_e = e;
      }
    }
    weights[t * K + k] = best_p;
    experts[t * K + k] = best_e;
    total += best_p;
    prev_key = best_key;
    prev_e = best_e;
  }
  for (int64_t k = 0; k < K; ++k) {
    weights[t * K + k] /= total;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteBlock)
route_bwd_kernel(const float* __restrict__ grad_weights, const float* __restrict__ weights,
                 const int64_t* __restrict__ experts, int64_t T, int64_t K, int64_t E,
                 scalar_t* __restrict__ grad_logits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) {
    return;
  }
  float dot = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    dot += weights[t * K + k] * grad_weights[t * K + k];
  }
  scalar_t* out = grad_logits + t * E;
  for (int64_t e = 0; e < E; ++e) {
    out[e] = static_cast<scalar_t>(0.0f);
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = experts[t * K + k];
    CUDA_KERNEL_ASSERT(e >= 0 && e < E && "route_backward: expert id out of range [0, num_experts)");
    const float g = weights[t * K + k] * (grad_weights[t * K + k] - dot);
    out[e] = static_cast<scalar_t>(static_cast<float>(out[e]) + g);
  }
}

}  // namespace
}  // namespace mixlora
