#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "simd.h"
#include "threads.h"

namespace ovseg {

namespace {
OVSEG_MULTIVERSION void normalise_block(float* p, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* v = p + r * cols;
    float part[16] = {};
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      for (int j = 0; j < 16; ++j) part[j] += v[c + j] * v[c + j];
    double ss = 0.0;
    for (; c < cols; ++c) ss += static_cast<double>(v[c]) * v[c];
    for (int j = 0; j < 16; ++j) ss += part[j];
    if (ss == 0.0) continue;
    const float inv = static_cast<float>(1.0 / std::sqrt(ss));
    for (c = 0; c < cols; ++c) v[c] *= inv;
  }
}
}  // namespace

void normalise_rows(float* p, int64_t rows, int64_t cols) {
  parallel_for(rows, std::max<int64_t>(1, (1 << 15) / cols), [&](int64_t b, int64_t e) {
    normalise_block(p + b * cols, e - b, cols);
  });
}

namespace {
OVSEG_MULTIVERSION bool finite_block(const float* p, int64_t n) {
  uint32_t worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, 4);
    worst = std::max(worst, bits & 0x7fffffffu);
  }
  return worst < 0x7f800000u;
}
}  // namespace

bool all_finite(const float* p, int64_t n) {
  std::atomic<bool> ok{true};
  parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    if (!finite_block(p + b, e - b)) ok.store(false);
  });
  return ok.load();
}

}  // namespace ovseg
