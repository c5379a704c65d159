// The overlay blend table of the CUDA render kernel (cuda_render.cu); the CPU
// side has no overlay. Compiled with -ffp-contract=off (CMakeLists.txt): the
// rounding of the blend must not depend on whether the compiler fuses the
// multiply-add.
#include <cmath>

#include "kernels.h"

namespace ovseg {

namespace {
uint8_t blend_value(double alpha, int f, int p) {
  const double v = (1.0 - alpha) * f + alpha * p;
  return static_cast<uint8_t>(std::nearbyint(v));
}
}  // namespace

void blend_lut(double alpha, const uint8_t* palette, int64_t K, uint8_t* lut) {
  for (int64_t kc = 0; kc < K * 3; ++kc)
    for (int f = 0; f < 256; ++f) lut[kc * 256 + f] = blend_value(alpha, f, palette[kc]);
}

}  // namespace ovseg
