// Kernels that check the harness itself (test_cuda_cpu_harness.py): one correct use of each built-in, and one
// misuse of each that the harness must report. Compiled like the kernels of csrc/ (cuda_cpu_harness.py).
#include "common.cuh"
#include "launchers.h"

namespace {

enum Case : int {
  kExchange = 0,         // out[t] = in[(t + 1) % n] through shared memory, with the barrier
  kExchangeNoBarrier,    // the same without the barrier
  kWarpOps,              // shuffles and votes, see below
  kBarrierAfterExit,     // half of the block returns, the other half waits at __syncthreads
  kTwoBarriers,          // odd and even threads wait at different __syncthreads
  kSharedOutOfBounds,    // s[t + 1] of a shared array of n
  kSharedOutOfBoundsByPointer,  // the same through a device function that gets the array as a pointer
  kDynamicOutOfBounds,   // d[t + 1] of the launch's n floats of dynamic shared memory
  kDeviceAssert,         // CUDA_KERNEL_ASSERT(in[t] >= 0)
  kShuffleAfterExit,     // lane 5 returns, the others shuffle with the full mask
  kExchangeWarpSync,     // out[t] = s[(t + 32) % n], the next warp's value, after a __syncwarp only
};

constexpr int kMaxThreads = 256;

__device__ __forceinline__ void store(float* p, int i, float v) {
  p[i] = v;
}

__global__ void selftest_kernel(int which, const float* __restrict__ in, float* __restrict__ out, int n) {
  __shared__ float s[kMaxThreads];
  const int t = threadIdx.x;
  float* d = mixlora::dynamic_smem<float>();
  switch (which) {
    case kExchange:
    case kExchangeNoBarrier:
      s[t] = in[t];
      if (which == kExchange) {
        __syncthreads();
      }
      out[t] = s[(t + 1) % n];
      break;
    case kExchangeWarpSync:
      s[t] = in[t];
      __syncwarp();
      out[t] = s[(t + 32) % n];
      break;
    case kWarpOps: {
      // out[4t .. 4t+3] = warp sum (xor butterfly), lane 3's value, the value of lane - 1 (shfl_up; lane 0 keeps
      // its own), and the ballot of in > 0 (as a float of its low 24 bits).
      float v = in[t];
      for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
      }
      out[4 * t] = v;
      out[4 * t + 1] = __shfl_sync(0xffffffffu, in[t], 3);
      out[4 * t + 2] = __shfl_up_sync(0xffffffffu, in[t], 1);
      out[4 * t + 3] = static_cast<float>(__ballot_sync(0xffffffffu, in[t] > 0.0f) & 0xffffffu);
      break;
    }
    case kBarrierAfterExit:
      if (t >= n / 2) {
        return;
      }
      __syncthreads();
      out[t] = in[t];
      break;
    case kTwoBarriers:
      if (t % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      out[t] = in[t];
      break;
    case kSharedOutOfBounds: {
      __shared__ float small[64];
      small[t + 1] = in[t];
      break;
    }
    case kSharedOutOfBoundsByPointer: {
      __shared__ float small[64];
      store(small, t + 1, in[t]);
      break;
    }
    case kDynamicOutOfBounds:
      d[t + 1] = in[t];
      break;
    case kDeviceAssert:
      CUDA_KERNEL_ASSERT(in[t] >= 0.0f && "selftest: negative input");
      out[t] = in[t];
      break;
    case kShuffleAfterExit:
      if (t == 5) {
        return;
      }
      out[t] = __shfl_xor_sync(0xffffffffu, in[t], 1);
      break;
  }
}

}  // namespace

extern "C" int cuda_cpu_selftest(int which, const float* in, float* out, int64_t n) {
  return cuda_cpu::guarded([&] {
    const size_t smem = which == kDynamicOutOfBounds ? n * sizeof(float) : 0;
    CUDA_CPU_LAUNCH(selftest_kernel, 1, static_cast<unsigned int>(n), smem, which, in, out, static_cast<int>(n));
  });
}
