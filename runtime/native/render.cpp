// Label maps (upsample_argmax): the K score maps are resampled along x one
// source row at a time (two rows cached per thread), blended along y per
// output row and arg-maxed over K in registers. Output pixels between four
// source points where one channel strictly wins skip the per-pixel work
// altogether.
#include <algorithm>
#include <cstring>

#include "bilinear.h"
#include "kernels.h"
#include "simd.h"
#include "threads.h"

namespace ovseg {
namespace {

constexpr int kBlock = 32;  // output columns per argmax block

// The score maps [K, h, w] and the output width.
struct Maps {
  const float* scores;
  int64_t K, h, w, out_w;
};

// One source row of every channel, resampled to the output width: out[k, x]
// for x < W, rows row_len >= W long, padded with the last value.
// Output columns come in stretches sharing their left tap, so the inner loop
// broadcasts two source values instead of gathering.
OVSEG_MULTIVERSION void resample_row(const float* scores, int64_t K, int64_t h, int64_t w,
                                     int64_t ys, const Axis& ax, int64_t W, int64_t row_len,
                                     float* out) {
  const float* w0 = ax.w0.data();
  const float* w1 = ax.w1.data();
  for (int64_t k = 0; k < K; ++k) {
    const float* src = scores + (k * h + ys) * w;
    float* o = out + k * row_len;
    int64_t x = 0;
    for (int64_t i = 0; i < w; ++i) {
      const float s0 = src[i], s1 = src[std::min(i + 1, w - 1)];
      for (const int64_t e = ax.end[i]; x < e; ++x) o[x] = s0 * w0[x] + s1 * w1[x];
    }
    std::fill(o + W, o + row_len, o[W - 1]);
  }
}

// Blends two resampled rows vertically and takes the argmax over channels for
// the blocks of kBlock columns in [x0, x1); '>' keeps the lowest index on ties.
// A block's running maxima stay in registers across the channels, and the
// update is branch-free (max, mask) so it vectorises.
OVSEG_MULTIVERSION void argmax_blocks(const float* r0, const float* r1, float a0, float a1,
                                      int64_t K, int64_t row_len, int64_t x0, int64_t x1,
                                      int32_t* __restrict arg) {
  for (int64_t xb = x0; xb < x1; xb += kBlock) {
    float best[kBlock];
    int32_t idx[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      best[j] = r0[xb + j] * a0 + r1[xb + j] * a1;
      idx[j] = 0;
    }
    for (int64_t k = 1; k < K; ++k) {
      const float* p0 = r0 + k * row_len + xb;
      const float* p1 = r1 + k * row_len + xb;
      const int32_t kk = static_cast<int32_t>(k);
      for (int j = 0; j < kBlock; ++j) {
        const float v = p0[j] * a0 + p1[j] * a1;
        const int32_t m = -static_cast<int32_t>(v > best[j]);
        best[j] = std::max(v, best[j]);
        idx[j] = (idx[j] & ~m) | (kk & m);
      }
    }
    std::memcpy(arg + xb, idx, sizeof idx);
  }
}

// Holds the two resampled source rows the current output row needs.
class RowCache {
 public:
  RowCache(const Maps& a, const Axis& ax, int64_t row_len)
      : a_(a), ax_(ax), row_len_(row_len), buf_(2 * a.K * row_len) {}

  // Returns the resampled source row ys, keeping row `keep` if cached.
  const float* get(int64_t ys, int64_t keep) {
    for (int s = 0; s < 2; ++s)
      if (id_[s] == ys) return slot(s);
    const int s = id_[0] == keep ? 1 : 0;
    resample_row(a_.scores, a_.K, a_.h, a_.w, ys, ax_, a_.out_w, row_len_, slot(s));
    id_[s] = ys;
    return slot(s);
  }

 private:
  float* slot(int s) { return buf_.data() + s * a_.K * row_len_; }
  const Maps& a_;
  const Axis& ax_;
  const int64_t row_len_;
  Buffer<float> buf_;
  int64_t id_[2] = {-1, -1};
};

// Strict argmax of every source point, -1 where the maximum is shared.
Buffer<int32_t> source_winners(const float* scores, int64_t K, int64_t hw) {
  Buffer<int32_t> win(hw);
  for (int64_t p = 0; p < hw; ++p) {
    float best = scores[p];
    int32_t arg = 0;
    bool tie = false;
    for (int64_t k = 1; k < K; ++k) {
      const float v = scores[k * hw + p];
      tie = v == best || (tie && v < best);
      if (v > best) {
        best = v;
        arg = static_cast<int32_t>(k);
      }
    }
    win[p] = tie ? -1 : arg;
  }
  return win;
}

void argmax_rows(const Maps& a, const Axis& ay, const Axis& ax, const int32_t* winners,
                 int32_t* labels, int64_t y_begin, int64_t y_end) {
  const int64_t W = a.out_w, w = a.w;
  const int64_t row_len = (W + kBlock - 1) / kBlock * kBlock;
  RowCache cache(a, ax, row_len);
  Buffer<int32_t> arg(row_len);
  for (int64_t y = y_begin; y < y_end; ++y) {
    const int32_t* win0 = winners + ay.i0[y] * w;
    const int32_t* win1 = winners + ay.i1[y] * w;
    // Every output pixel is a convex combination of its 4 source points, so
    // where one channel strictly wins at all four it wins everywhere between
    // them; only the other stretches of columns are evaluated per pixel.
    // Evaluating whole blocks may redo a few uniform pixels; same labels.
    auto evaluate = [&](int64_t x0, int64_t x1) {
      const float* r0 = cache.get(ay.i0[y], ay.i1[y]);
      const float* r1 = cache.get(ay.i1[y], ay.i0[y]);
      argmax_blocks(r0, r1, ay.w0[y], ay.w1[y], a.K, row_len, x0 / kBlock * kBlock,
                    (x1 + kBlock - 1) / kBlock * kBlock, arg.data());
    };
    int64_t mixed = -1, x = 0;
    for (int64_t i = 0; i < w; ++i) {
      const int64_t i1 = std::min(i + 1, w - 1), end = ax.end[i];
      const int32_t c = win0[i];
      if (c >= 0 && c == win0[i1] && c == win1[i] && c == win1[i1]) {
        if (mixed >= 0) evaluate(mixed, x);
        mixed = -1;
        std::fill(arg.data() + x, arg.data() + end, c);
      } else if (mixed < 0) {
        mixed = x;
      }
      x = end;
    }
    if (mixed >= 0) evaluate(mixed, W);
    std::memcpy(labels + y * W, arg.data(), W * sizeof(int32_t));
  }
}

}  // namespace

void upsample_argmax(const float* scores, int64_t K, int64_t h, int64_t w, int64_t out_h,
                     int64_t out_w, int32_t* labels) {
  const Maps maps{scores, K, h, w, out_w};
  const Axis ay(h, out_h), ax(w, out_w);
  const Buffer<int32_t> winners = source_winners(scores, K, h * w);
  // Bands of rows, at least 8 rows each: a band re-resamples its first source rows.
  parallel_for(out_h, 8, [&](int64_t y0, int64_t y1) {
    argmax_rows(maps, ay, ax, winners.data(), labels, y0, y1);
  });
}

void default_palette(int64_t K, uint8_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    uint8_t rgb[3] = {0, 0, 0};
    int64_t v = k;
    for (int bit = 7; v > 0 && bit >= 0; --bit, v >>= 3)
      for (int c = 0; c < 3; ++c) rgb[c] |= static_cast<uint8_t>(((v >> c) & 1) << bit);
    out[k * 3] = rgb[2];
    out[k * 3 + 1] = rgb[1];
    out[k * 3 + 2] = rgb[0];
  }
}

}  // namespace ovseg
