// CUDA versions of the pooling and rendering kernels. Host pointers in and
// out, the same contracts as the CPU functions in kernels.h except that the
// inputs must already be checked for NaN/Inf; they throw std::runtime_error
// on CUDA errors.
#pragma once
#include <cstdint>
#include <string>

#include "kernels.h"

namespace ovseg {
namespace cuda {

// Empty when a CUDA device can be used, else why not.
std::string unavailable_reason();

void pool_segments(const int32_t* labels, int64_t H, int64_t W, const float* features,
                   int64_t hf, int64_t wf, int64_t D, int64_t K, float* emb, float* areas);

void render(const RenderArgs& a);

}  // namespace cuda
}  // namespace ovseg
