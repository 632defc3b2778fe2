// The BLAS behind torch's fp32 matmuls, for the kernels' rank-R GEMMs (cpu_common.h: gemm).

#include "cpu_common.h"

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace mixlora_cpu {

SgemmFn blas_sgemm() {
#if defined(__linux__)
  // libtorch_cpu is loaded (this library links it); its dependencies are searched too (an OpenBLAS build's).
  void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  if (torch_cpu == nullptr) return nullptr;
  return reinterpret_cast<SgemmFn>(dlsym(torch_cpu, "sgemm_"));
#else
  return nullptr;  // elsewhere the GEMMs go through at::mm
#endif
}

}  // namespace mixlora_cpu
