// Spherical k-means on L2-normalised rows: assignment by maximum cosine,
// centres = normalised member sums. Every step is independent of the thread
// count, so a seed gives the same result on any machine with the same build.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "kernels.h"
#include "memory.h"
#include "simd.h"
#include "threads.h"

namespace ovseg {
namespace {

constexpr int64_t kLanes = 16;  // centres per micro-kernel block

// splitmix64: a small, well-specified generator (std:: distributions are not
// reproducible across standard libraries).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  int64_t below(int64_t n) { return std::min(n - 1, static_cast<int64_t>(uniform() * n)); }

 private:
  uint64_t s_;
};

// scores[r, :k] and the argmax for rows [r0, r1) of x, against the centres
// given transposed and padded: ct[d, j], j < kp (a multiple of kLanes). Four
// rows at a time keep 4 x kLanes accumulators in registers; a short last
// group repeats its last row.
OVSEG_MULTIVERSION void score_rows(const float* x, int64_t D, const float* ct, int64_t kp,
                                   int64_t k, int64_t r0, int64_t r1, float* scores,
                                   int32_t* assign) {
  for (int64_t r = r0; r < r1; r += 4) {
    const float* xr[4];
    for (int i = 0; i < 4; ++i) xr[i] = x + std::min(r + i, r1 - 1) * D;
    for (int64_t j0 = 0; j0 < kp; j0 += kLanes) {
      Vec8 acc[4][2] = {};
      for (int64_t d = 0; d < D; ++d) {
        const Vec8 c0 = OVSEG_LOAD8(ct + d * kp + j0), c1 = OVSEG_LOAD8(ct + d * kp + j0 + 8);
        for (int i = 0; i < 4; ++i) {
          const Vec8 xv = OVSEG_SPLAT8(xr[i][d]);
          acc[i][0] += xv * c0;
          acc[i][1] += xv * c1;
        }
      }
      const int64_t n = std::min(kLanes, k - j0);
      for (int i = 0; i < 4 && r + i < r1; ++i) {
        float out[kLanes];
        OVSEG_STORE8(out, acc[i][0]);
        OVSEG_STORE8(out + 8, acc[i][1]);
        std::memcpy(scores + (r + i) * k + j0, out, n * sizeof(float));
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = scores + r * k;
    assign[r] = static_cast<int32_t>(std::max_element(s, s + k) - s);
  }
}

OVSEG_MULTIVERSION void add_members(const float* x, const int32_t* assign, int64_t N, int64_t D,
                                    int64_t d0, int64_t d1, float* sums) {
  for (int64_t n = 0; n < N; ++n) {
    const float* src = x + n * D;
    float* dst = sums + assign[n] * D;
    for (int64_t d = d0; d < d1; ++d) dst[d] += src[d];
  }
}

// out[r] = x[r] . c for rows [r0, r1), four rows at a time.
OVSEG_MULTIVERSION void dot_rows(const float* x, int64_t D, const float* c, int64_t r0,
                                 int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; r += 4) {
    const float* xr[4];
    for (int i = 0; i < 4; ++i) xr[i] = x + std::min(r + i, r1 - 1) * D;
    Vec8 acc[4][2] = {};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const Vec8 c0 = OVSEG_LOAD8(c + d), c1 = OVSEG_LOAD8(c + d + 8);
      for (int i = 0; i < 4; ++i) {
        acc[i][0] += OVSEG_LOAD8(xr[i] + d) * c0;
        acc[i][1] += OVSEG_LOAD8(xr[i] + d + 8) * c1;
      }
    }
    for (int i = 0; i < 4 && r + i < r1; ++i) {
      float part[16];
      OVSEG_STORE8(part, acc[i][0]);
      OVSEG_STORE8(part + 8, acc[i][1]);
      float s = 0.0f;
      for (int64_t e = d; e < D; ++e) s += xr[i][e] * c[e];
      for (int j = 0; j < 16; ++j) s += part[j];
      out[r + i] = s;
    }
  }
}

class KMeans {
 public:
  KMeans(const float* xn, int64_t N, int64_t D, int64_t k)
      : x_(xn), N_(N), D_(D), k_(k), kp_((k + kLanes - 1) / kLanes * kLanes), ct_(D * kp_, true) {}

  // k-means++ on the distance 1 - cos: the first centre uniformly, the next
  // ones with probability proportional to the distance to the nearest centre.
  void seed(uint64_t seed, float* centres) {
    Rng rng(seed);
    Buffer<float> dist(N_), cos(N_);
    for (int64_t c = 0; c < k_; ++c) {
      int64_t pick = 0;
      double total = 0.0;
      if (c > 0)
        for (int64_t n = 0; n < N_; ++n) total += dist[n];
      if (c == 0 || total <= 0.0) {  // only duplicates of chosen centres remain
        pick = rng.below(N_);
      } else {
        const double target = rng.uniform() * total;
        double cum = 0.0;
        pick = -1;
        for (int64_t n = 0; n < N_; ++n) {
          if (dist[n] <= 0.0f) continue;
          pick = n;
          cum += dist[n];
          if (cum > target) break;
        }
      }
      const float* p = x_ + pick * D_;
      std::copy(p, p + D_, centres + c * D_);
      if (c + 1 == k_) break;
      parallel_for(N_, 256, [&](int64_t b, int64_t e) {
        dot_rows(x_, D_, p, b, e, cos.data());
        for (int64_t n = b; n < e; ++n) {
          const float d = std::max(0.0f, 1.0f - cos[n]);
          dist[n] = c == 0 ? d : std::min(dist[n], d);
        }
      });
    }
  }

  void assign(const float* centres, float* scores, int32_t* assign) {
    for (int64_t j = 0; j < k_; ++j)
      for (int64_t d = 0; d < D_; ++d) ct_[d * kp_ + j] = centres[j * D_ + d];
    parallel_for(N_, 64, [&](int64_t b, int64_t e) {
      score_rows(x_, D_, ct_.data(), kp_, k_, b, e, scores, assign);
    });
  }

  // New centres from an assignment; returns the largest centre shift.
  double update(const float* scores, int32_t* assign, float* centres) {
    Buffer<float> sums(k_ * D_, true);
    parallel_for(D_, 32, [&](int64_t d0, int64_t d1) {
      add_members(x_, assign, N_, D_, d0, d1, sums.data());
    });
    Buffer<int64_t> count(k_, true);
    for (int64_t n = 0; n < N_; ++n) ++count[assign[n]];
    reseed_empty(scores, assign, count.data(), sums.data());
    normalise_rows(sums.data(), k_, D_);
    double shift = 0.0;
    for (int64_t j = 0; j < k_; ++j) {
      float* s = sums.data() + j * D_;
      float* c = centres + j * D_;
      if (std::all_of(s, s + D_, [](float v) { return v == 0.0f; })) continue;  // keep centre
      double ss = 0.0;
      for (int64_t d = 0; d < D_; ++d) ss += (static_cast<double>(s[d]) - c[d]) * (s[d] - c[d]);
      shift = std::max(shift, std::sqrt(ss));
      std::copy(s, s + D_, c);
    }
    return shift;
  }

 private:
  // Each empty cluster takes the point farthest from its centre (lowest
  // score) among clusters that keep at least one member. With no such point
  // (k > N) the cluster keeps its centre.
  void reseed_empty(const float* scores, int32_t* assign, int64_t* count, float* sums) {
    if (std::find(count, count + k_, 0) == count + k_) return;
    Buffer<int64_t> order(N_);
    std::iota(order.data(), order.data() + N_, 0);
    auto own = [&](int64_t n) { return scores[n * k_ + assign[n]]; };
    std::stable_sort(order.data(), order.data() + N_,
                     [&](int64_t a, int64_t b) { return own(a) < own(b); });
    int64_t next = 0;
    for (int64_t j = 0; j < k_; ++j) {
      if (count[j] != 0) continue;
      while (next < N_ && count[assign[order[next]]] <= 1) ++next;
      if (next == N_) break;
      const int64_t p = order[next++];
      const float* xp = x_ + p * D_;
      float* from = sums + assign[p] * D_;
      for (int64_t d = 0; d < D_; ++d) from[d] -= xp[d];
      --count[assign[p]];
      assign[p] = static_cast<int32_t>(j);
      count[j] = 1;
      std::copy(xp, xp + D_, sums + j * D_);
    }
  }

  const float* x_;
  int64_t N_, D_, k_, kp_;
  Buffer<float> ct_;
};

}  // namespace

void spherical_kmeans(const float* x, int64_t N, int64_t D, int64_t k, int64_t max_iter,
                      uint64_t seed, const float* init, double tol, float* centres,
                      int32_t* assign, float* scores) {
  Buffer<float> xn(N * D);
  std::copy(x, x + N * D, xn.data());
  normalise_rows(xn.data(), N, D);
  KMeans km(xn.data(), N, D, k);
  if (init) {
    std::copy(init, init + k * D, centres);
    normalise_rows(centres, k, D);
  } else {
    km.seed(seed, centres);
  }
  for (int64_t it = 0; it < max_iter; ++it) {
    km.assign(centres, scores, assign);
    if (km.update(scores, assign, centres) < tol) break;
  }
  km.assign(centres, scores, assign);
}

}  // namespace ovseg
