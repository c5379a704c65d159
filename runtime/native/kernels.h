// CPU kernels. Arguments are validated by the bindings (module.cpp); these
// functions assume C-contiguous, correctly shaped, finite inputs.
#pragma once
#include <cstdint>

namespace ovseg {

// Bilinear upsampling of the K score maps [K, h, w] to [out_h, out_w] and the
// argmax over K (lowest index wins ties), one pass over the output: labels
// [out_h, out_w] (render.cpp).
void upsample_argmax(const float* scores, int64_t K, int64_t h, int64_t w, int64_t out_h,
                     int64_t out_w, int32_t* labels);

// Segment sums of the bilinearly upsampled features through the adjoint of the
// upsampling: emb[K, D] L2-normalised, areas[K] in pixels. Returns false (and
// leaves emb undefined) if the features contain NaN or Inf.
bool pool_segments(const int32_t* labels, int64_t H, int64_t W, const float* features,
                   int64_t hf, int64_t wf, int64_t D, int64_t K, float* emb, float* areas);

// Accumulates, for every label k in [0, K) and feature cell n, the summed
// bilinear weight of the pixels labelled k: acc[N, K] with N = hf * wf (layout
// n-major).
void segment_weights(const int32_t* labels, int64_t H, int64_t W, int64_t hf, int64_t wf,
                     int64_t K, float* acc, int64_t* areas);

void spherical_kmeans(const float* x, int64_t N, int64_t D, int64_t k, int64_t max_iter,
                      uint64_t seed, const float* init, double tol, float* centres,
                      int32_t* assign, float* scores);

// True when no element is NaN or +-Inf.
bool all_finite(const float* p, int64_t n);

// Scales each row to unit L2 norm; all-zero rows stay zero.
void normalise_rows(float* p, int64_t rows, int64_t cols);

// The PASCAL VOC colour map (bit-interleaved label index) in BGR order, any K.
void default_palette(int64_t K, uint8_t* out);

}  // namespace ovseg
