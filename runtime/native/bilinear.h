// Bilinear resampling weights along one axis, half-pixel centres
// (align_corners=False), edge-clamped: output o reads source taps i0 and i1
// with weights w0 and w1, where src = (o + 0.5) * in / out - 0.5 is clamped to
// [0, in - 1]. This is cv2.resize INTER_LINEAR and torch's
// F.interpolate(mode="bilinear", align_corners=False) when upsampling.
#pragma once
#include <algorithm>
#include <cstdint>

#include "memory.h"

namespace ovseg {

struct Axis {
  Buffer<int32_t> i0, i1;
  Buffer<float> w0, w1;
  Buffer<double> lam;   // w1 in double precision
  Buffer<int64_t> end;  // end[i]: first output index whose left tap is > i

  Axis(int64_t in, int64_t out) : i0(out), i1(out), w0(out), w1(out), lam(out), end(in) {
    const double scale = static_cast<double>(in) / static_cast<double>(out);
    for (int64_t o = 0; o < out; ++o) {
      const double src = std::max(0.0, (static_cast<double>(o) + 0.5) * scale - 0.5);
      int64_t i = static_cast<int64_t>(src);
      double l = src - static_cast<double>(i);
      if (i >= in - 1) {
        i = in - 1;
        l = 0.0;
      }
      i0[o] = static_cast<int32_t>(i);
      i1[o] = static_cast<int32_t>(std::min(i + 1, in - 1));
      w0[o] = static_cast<float>(1.0 - l);
      w1[o] = static_cast<float>(l);
      lam[o] = l;
    }
    int64_t o = 0;
    for (int64_t i = 0; i < in; ++i) {
      while (o < out && i0[o] <= i) ++o;
      end[i] = o;
    }
  }
};

}  // namespace ovseg
