// Fused per-segment pooling (docs/DESIGN.md, "Fused per-segment pooling — the exact
// math"). The mean of the upsampled features over segment k is
//   E_k = (1/|S_k|) sum_{p in S_k} sum_n U(p, n) F_n = (1/|S_k|) (U^T M_k) F,
// so the masks are pooled down with the adjoint of the separable bilinear
// upsampling U = U_y (x) U_x into acc[n, k], then one product acc^T F.
//
// The output pixels whose taps are source rows (i, i+1) and columns (j, j+1)
// form a block. Where a block has a single label, its contribution to those
// four cells is a product of the block's summed row and column weights; only
// blocks cut by a segment boundary are walked row by row, in runs of equal
// labels. The labels are read once and U(F) is never formed.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "bilinear.h"
#include "kernels.h"
#include "simd.h"
#include "threads.h"

namespace ovseg {
namespace {

// One axis' outputs grouped by left tap: [begin(i), end(i)) read taps i and
// i + 1; the summed weights of a range come from prefix sums of lam.
struct Stretches {
  const Axis& ax;
  Buffer<double> prefix;  // prefix[o]: sum of lam over outputs < o

  Stretches(const Axis& a, int64_t out) : ax(a), prefix(out + 1) {
    prefix[0] = 0.0;
    for (int64_t o = 0; o < out; ++o) prefix[o + 1] = prefix[o] + a.lam[o];
  }
  int64_t begin(int64_t i) const { return i == 0 ? 0 : ax.end[i - 1]; }
  int64_t end(int64_t i) const { return ax.end[i]; }
  double right(int64_t a, int64_t b) const { return prefix[b] - prefix[a]; }
  double left(int64_t a, int64_t b) const { return static_cast<double>(b - a) - right(a, b); }
};

// True when every label in rows [ya, yb) x columns [xa, xb) is k.
OVSEG_MULTIVERSION bool block_is(const int32_t* labels, int64_t W, int64_t ya, int64_t yb,
                                 int64_t xa, int64_t xb, int32_t k) {
  for (int64_t y = ya; y < yb; ++y) {
    const int32_t* row = labels + y * W;
    int32_t diff = 0;
    for (int64_t x = xa; x < xb; ++x) diff |= row[x] ^ k;
    if (diff) return false;
  }
  return true;
}

// True when rows a and b agree on columns [xa, xb).
OVSEG_MULTIVERSION bool same_span(const int32_t* a, const int32_t* b, int64_t xa, int64_t xb) {
  int32_t diff = 0;
  for (int64_t x = xa; x < xb; ++x) diff |= a[x] ^ b[x];
  return diff == 0;
}

// The acc rows (source rows i and i + 1) a block row band writes, null when
// another task owns them, with their vertical weights.
struct Band {
  float* top;
  float* bottom;
  int64_t wf, K;

  void add(int64_t j, int64_t k, double w_top, double w_bottom, double left, double right) const {
    if (top) {
      top[j * K + k] += static_cast<float>(w_top * left);
      if (j + 1 < wf) top[(j + 1) * K + k] += static_cast<float>(w_top * right);
    }
    if (bottom && w_bottom != 0.0) {
      bottom[j * K + k] += static_cast<float>(w_bottom * left);
      if (j + 1 < wf) bottom[(j + 1) * K + k] += static_cast<float>(w_bottom * right);
    }
  }
};

// acc rows [r0, r1) (each written by exactly one task, always in the same
// order, so the result does not depend on the thread count), and the areas of
// the output rows whose top tap is in [r0, r1).
void accumulate_band(const int32_t* labels, int64_t W, const Stretches& ys,
                     const Stretches& xs, int64_t hf, int64_t wf, int64_t K, int64_t r0,
                     int64_t r1, float* acc, int64_t* areas) {
  std::fill(acc + r0 * wf * K, acc + r1 * wf * K, 0.0f);
  for (int64_t i = std::max<int64_t>(r0 - 1, 0); i < r1; ++i) {
    const int64_t ya = ys.begin(i), yb = ys.end(i);
    if (ya == yb) continue;
    const bool own_top = i >= r0;
    const Band band{own_top ? acc + i * wf * K : nullptr,
                    i + 1 < std::min(r1, hf) ? acc + (i + 1) * wf * K : nullptr, wf, K};
    for (int64_t j = 0; j < wf; ++j) {
      const int64_t xa = xs.begin(j), xb = xs.end(j);
      if (xa == xb) continue;
      const int32_t first = labels[ya * W + xa];
      if (block_is(labels, W, ya, yb, xa, xb, first)) {
        if (first < 0 || first >= K) continue;
        if (own_top) areas[first] += (yb - ya) * (xb - xa);
        band.add(j, first, ys.left(ya, yb), ys.right(ya, yb), xs.left(xa, xb), xs.right(xa, xb));
        continue;
      }
      // A block cut by a boundary: runs of equal labels, row by row, with
      // identical consecutive rows (a vertical-ish boundary) taken together.
      for (int64_t y = ya; y < yb;) {
        const int32_t* row = labels + y * W;
        double w_top = 0.0, w_bottom = 0.0;
        int64_t y2 = y;
        do {
          w_bottom += ys.ax.lam[y2];
          w_top += 1.0 - ys.ax.lam[y2];
          ++y2;
        } while (y2 < yb && same_span(row, labels + y2 * W, xa, xb));
        for (int64_t x = xa; x < xb;) {
          const int32_t k = row[x];
          int64_t e = x + 1;
          while (e < xb && row[e] == k) ++e;
          if (k >= 0 && k < K) {
            if (own_top) areas[k] += (e - x) * (y2 - y);
            band.add(j, k, w_top, w_bottom, xs.left(x, e), xs.right(x, e));
          }
          x = e;
        }
        y = y2;
      }
    }
  }
}

// emb[k, d0:d1] = sum_n acc[n, k] * F[n, d0:d1], skipping zero weights (a
// segment touches few cells). Also checks F[:, d0:d1] for NaN/Inf on the way.
OVSEG_MULTIVERSION bool weighted_sums(const float* acc, const float* F, int64_t N, int64_t K,
                                      int64_t D, int64_t d0, int64_t d1, float* emb) {
  const int64_t len = d1 - d0;
  for (int64_t k = 0; k < K; ++k) std::fill(emb + k * D + d0, emb + k * D + d1, 0.0f);
  uint32_t worst = 0;
  for (int64_t n = 0; n < N; ++n) {
    const float* __restrict f = F + n * D + d0;
    for (int64_t d = 0; d < len; ++d) {
      uint32_t bits;
      std::memcpy(&bits, f + d, 4);
      worst = std::max(worst, bits & 0x7fffffffu);
    }
    const float* a = acc + n * K;
    for (int64_t k = 0; k < K; ++k) {
      const float s = a[k];
      if (s == 0.0f) continue;
      float* __restrict e = emb + k * D + d0;
      for (int64_t d = 0; d < len; ++d) e[d] += s * f[d];
    }
  }
  return worst < 0x7f800000u;
}

}  // namespace

void segment_weights(const int32_t* labels, int64_t H, int64_t W, int64_t hf, int64_t wf,
                     int64_t K, float* acc, int64_t* areas) {
  const Axis ay(hf, H), ax(wf, W);
  const Stretches ys(ay, H), xs(ax, W);
  const int chunks = static_cast<int>(std::min<int64_t>(num_threads(), hf));
  std::vector<Buffer<int64_t>> band_areas;
  for (int c = 0; c < chunks; ++c) band_areas.emplace_back(K, true);
  parallel_tasks(chunks, [&](int c) {
    accumulate_band(labels, W, ys, xs, hf, wf, K, hf * c / chunks, hf * (c + 1) / chunks, acc,
                    band_areas[c].data());
  });
  std::fill(areas, areas + K, 0);
  for (const auto& band : band_areas)
    for (int64_t k = 0; k < K; ++k) areas[k] += band[k];
}

bool pool_segments(const int32_t* labels, int64_t H, int64_t W, const float* features,
                   int64_t hf, int64_t wf, int64_t D, int64_t K, float* emb, float* areas) {
  const int64_t N = hf * wf;
  Buffer<float> acc(N * K);
  Buffer<int64_t> counts(K);
  segment_weights(labels, H, W, hf, wf, K, acc.data(), counts.data());
  std::atomic<bool> finite{true};
  parallel_for(D, 64, [&](int64_t d0, int64_t d1) {
    if (!weighted_sums(acc.data(), features, N, K, D, d0, d1, emb)) finite.store(false);
  });
  if (!finite.load()) return false;
  normalise_rows(emb, K, D);
  for (int64_t k = 0; k < K; ++k) areas[k] = static_cast<float>(counts[k]);
  return true;
}

}  // namespace ovseg
