// The dtype dispatch of the launch code (csrc/<op>/<op>.cu), and the device facts it sizes grids by.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

// The I/O dtypes of the big (T, H) / (T, I) activations. fp64 is rejected in api.cpp (the torch reference serves
// it), so no double instantiation is compiled.
#define MIXLORA_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace mixlora {

// The multiprocessors of the current device.
inline int64_t current_device_sms() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

}  // namespace mixlora
