// Fused per-segment pooling (DESIGN.md, "Fused per-segment pooling — the exact
// math"). The mean of the upsampled features over segment k is
//   E_k = (1/|S_k|) sum_{p in S_k} sum_n U(p, n) F_n = (1/|S_k|) (U^T M_k) F,
// so the masks are pooled down with the adjoint of the separable bilinear
// upsampling U = U_y (x) U_x into acc[n, k], then one product acc^T F.
//
// Per output row, each run [a, b) of one label adds its column weights
// sum_{x in [a, b)} U_x(x, j) — read off prefix sums of the bilinear fraction —
// to the two source rows the output row reads, scaled by their U_y weights.
// The cost is O(H * W / 16 + runs), and U(F) is never formed.
#include <algorithm>
#include <cmath>
#include <vector>

#include "bilinear.h"
#include "kernels.h"
#include "simd.h"
#include "threads.h"

namespace ovseg {
namespace {

// Column side of the adjoint: output columns come in stretches that share
// their left tap i; within a stretch the right tap gets the summed fraction
// lam and the left tap the rest.
struct Columns {
  const Axis& ax;
  Buffer<double> prefix;  // prefix[x]: sum of lam over output columns < x

  Columns(const Axis& a, int64_t out) : ax(a), prefix(out + 1) {
    prefix[0] = 0.0;
    for (int64_t x = 0; x < out; ++x) prefix[x + 1] = prefix[x] + a.lam[x];
  }
};

struct Target {
  float* row;  // acc + source_row * wf * K
  double w;    // U_y weight of that source row
};

// End of the run of equal labels starting at x.
OVSEG_MULTIVERSION int64_t run_end(const int32_t* row, int64_t x, int64_t W) {
  const int32_t k = row[x++];
  while (x + 16 <= W) {
    int32_t diff = 0;
    for (int j = 0; j < 16; ++j) diff |= row[x + j] ^ k;
    if (diff) break;
    x += 16;
  }
  while (x < W && row[x] == k) ++x;
  return x;
}

void add_run(const Columns& cols, int64_t wf, int64_t K, int64_t k, int64_t a, int64_t b,
             const Target* targets, int n_targets) {
  for (int64_t s = a; s < b;) {
    const int64_t i = cols.ax.i0[s];
    const int64_t e = std::min(b, cols.ax.end[i]);
    const double right = cols.prefix[e] - cols.prefix[s];
    const double left = static_cast<double>(e - s) - right;
    for (int t = 0; t < n_targets; ++t) {
      float* cell = targets[t].row + i * K + k;
      cell[0] += static_cast<float>(targets[t].w * left);
      if (i + 1 < wf) cell[K] += static_cast<float>(targets[t].w * right);
    }
    s = e;
  }
}

// acc[i, j, k] += weights from the output rows whose taps fall in the source
// rows [r0, r1) owned by this task; areas are counted for the output rows whose
// top tap is owned. Every acc row is written by exactly one task, in output-row
// order, so the result does not depend on the number of threads.
void accumulate_band(const int32_t* labels, int64_t W, const Axis& ay, int64_t H,
                     const Columns& cols, int64_t wf, int64_t K, int64_t r0, int64_t r1,
                     float* acc, int64_t* areas) {
  std::fill(acc + r0 * wf * K, acc + r1 * wf * K, 0.0f);
  const int32_t* i0 = ay.i0.data();
  const int64_t y_begin = std::lower_bound(i0, i0 + H, static_cast<int32_t>(r0 - 1)) - i0;
  const int64_t y_end = std::lower_bound(i0, i0 + H, static_cast<int32_t>(r1)) - i0;
  for (int64_t y = y_begin; y < y_end; ++y) {
    Target targets[2];
    int n = 0;
    const bool primary = ay.i0[y] >= r0;
    if (primary) targets[n++] = {acc + ay.i0[y] * wf * K, 1.0 - ay.lam[y]};
    if (ay.lam[y] != 0.0 && ay.i1[y] >= r0 && ay.i1[y] < r1)
      targets[n++] = {acc + ay.i1[y] * wf * K, ay.lam[y]};
    if (n == 0) continue;
    const int32_t* row = labels + y * W;
    for (int64_t x = 0; x < W;) {
      const int64_t b = run_end(row, x, W);
      const int32_t k = row[x];
      if (k >= 0 && k < K) {
        if (primary) areas[k] += b - x;
        add_run(cols, wf, K, k, x, b, targets, n);
      }
      x = b;
    }
  }
}

// emb[k, d0:d1] = sum_n acc[n, k] * F[n, d0:d1], skipping zero weights (each
// segment touches few cells).
OVSEG_MULTIVERSION void weighted_sums(const float* acc, const float* F, int64_t N, int64_t K,
                                      int64_t D, int64_t d0, int64_t d1, float* emb) {
  const int64_t len = d1 - d0;
  for (int64_t k = 0; k < K; ++k) std::fill(emb + k * D + d0, emb + k * D + d1, 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    const float* a = acc + n * K;
    const float* f = F + n * D + d0;
    for (int64_t k = 0; k < K; ++k) {
      const float s = a[k];
      if (s == 0.0f) continue;
      float* e = emb + k * D + d0;
      for (int64_t d = 0; d < len; ++d) e[d] += s * f[d];
    }
  }
}

}  // namespace

void segment_weights(const int32_t* labels, int64_t H, int64_t W, int64_t hf, int64_t wf,
                     int64_t K, float* acc, int64_t* areas) {
  const Axis ay(hf, H), ax(wf, W);
  const Columns cols(ax, W);
  const int chunks = static_cast<int>(std::min<int64_t>(num_threads(), hf));
  std::vector<Buffer<int64_t>> band_areas;
  for (int c = 0; c < chunks; ++c) band_areas.emplace_back(K, true);
  parallel_tasks(chunks, [&](int c) {
    accumulate_band(labels, W, ay, H, cols, wf, K, hf * c / chunks, hf * (c + 1) / chunks, acc,
                    band_areas[c].data());
  });
  std::fill(areas, areas + K, 0);
  for (const auto& band : band_areas)
    for (int64_t k = 0; k < K; ++k) areas[k] += band[k];
}

void pool_segments(const int32_t* labels, int64_t H, int64_t W, const float* features,
                   int64_t hf, int64_t wf, int64_t D, int64_t K, float* emb, float* areas) {
  const int64_t N = hf * wf;
  Buffer<float> acc(N * K);
  Buffer<int64_t> counts(K);
  segment_weights(labels, H, W, hf, wf, K, acc.data(), counts.data());
  parallel_for(D, 64, [&](int64_t d0, int64_t d1) {
    weighted_sums(acc.data(), features, N, K, D, d0, d1, emb);
  });
  normalise_rows(emb, K, D);
  for (int64_t k = 0; k < K; ++k) areas[k] = static_cast<float>(counts[k]);
}

}  // namespace ovseg
