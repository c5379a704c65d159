#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace ovseg {
namespace cuda {

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return cudaGetErrorString(e);
  }
  return count > 0 ? std::string() : std::string("no CUDA device found");
}

}  // namespace cuda
}  // namespace ovseg
