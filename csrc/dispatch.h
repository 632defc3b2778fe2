// The dtype dispatch of the launch code (csrc/<op>/<op>.cu).
#pragma once

#include <ATen/Dispatch.h>

// The I/O dtypes of the big (T, H) / (T, I) activations. fp64 is rejected in api.cpp (the torch reference serves
// it), so no double instantiation is compiled.
#define MIXLORA_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
