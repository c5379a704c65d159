// CUDA fused per-segment pooling: the same adjoint as pooling.cpp. One block
// per output row scatters the row's column weights per label into shared
// memory, then adds them, scaled by the row's two vertical weights, to the
// acc[n, k] accumulator; a second kernel forms acc^T F.
#include <algorithm>
#include <vector>

#include "bilinear.h"
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace ovseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxShared = 48 * 1024;

// With use_shared the block accumulates row[k, j] (K * wf floats) and the
// label counts (K) in shared memory first; otherwise every pixel adds straight
// into acc and areas.
__global__ void segment_weights_kernel(const int32_t* labels, int W, const int32_t* y0s,
                                       const int32_t* y1s, const float* wy0s, const float* wy1s,
                                       const int32_t* x0s, const int32_t* x1s, const float* wx0s,
                                       const float* wx1s, int wf, int K, bool use_shared,
                                       float* acc, unsigned long long* areas) {
  extern __shared__ float row[];
  unsigned int* counts = reinterpret_cast<unsigned int*>(row + K * wf);
  const int y = blockIdx.x;
  const int y0 = y0s[y], y1 = y1s[y];
  const float wy0 = wy0s[y], wy1 = wy1s[y];
  if (use_shared) {
    for (int i = threadIdx.x; i < K * wf; i += blockDim.x) row[i] = 0.0f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) counts[i] = 0u;
    __syncthreads();
  }
  for (int x = threadIdx.x; x < W; x += blockDim.x) {
    const int k = labels[static_cast<size_t>(y) * W + x];
    if (k < 0 || k >= K) continue;
    const int x0 = x0s[x], x1 = x1s[x];
    const float wx0 = wx0s[x], wx1 = wx1s[x];
    if (use_shared) {
      atomicAdd(&counts[k], 1u);
      atomicAdd(&row[k * wf + x0], wx0);
      if (wx1 != 0.0f) atomicAdd(&row[k * wf + x1], wx1);
    } else {
      atomicAdd(&areas[k], 1ull);
      atomicAdd(&acc[(static_cast<size_t>(y0) * wf + x0) * K + k], wy0 * wx0);
      if (wx1 != 0.0f) atomicAdd(&acc[(static_cast<size_t>(y0) * wf + x1) * K + k], wy0 * wx1);
      if (wy1 != 0.0f) {
        atomicAdd(&acc[(static_cast<size_t>(y1) * wf + x0) * K + k], wy1 * wx0);
        if (wx1 != 0.0f) atomicAdd(&acc[(static_cast<size_t>(y1) * wf + x1) * K + k], wy1 * wx1);
      }
    }
  }
  if (!use_shared) return;
  __syncthreads();
  for (int i = threadIdx.x; i < K; i += blockDim.x)
    if (counts[i]) atomicAdd(&areas[i], static_cast<unsigned long long>(counts[i]));
  for (int i = threadIdx.x; i < K * wf; i += blockDim.x) {
    const float v = row[i];
    if (v == 0.0f) continue;
    const int k = i / wf, j = i % wf;
    atomicAdd(&acc[(static_cast<size_t>(y0) * wf + j) * K + k], wy0 * v);
    if (wy1 != 0.0f) atomicAdd(&acc[(static_cast<size_t>(y1) * wf + j) * K + k], wy1 * v);
  }
}

// emb[k, d] = sum_n acc[n, k] * F[n, d]; grid (D / blockDim, K).
__global__ void weighted_sums_kernel(const float* acc, const float* F, int N, int K, int D,
                                     float* emb) {
  const int k = blockIdx.y;
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float s = 0.0f;
  for (int n = 0; n < N; ++n) {
    const float a = acc[static_cast<size_t>(n) * K + k];
    if (a != 0.0f) s += a * F[static_cast<size_t>(n) * D + d];
  }
  emb[static_cast<size_t>(k) * D + d] = s;
}

}  // namespace

void pool_segments(const int32_t* labels, int64_t H, int64_t W, const float* features,
                   int64_t hf, int64_t wf, int64_t D, int64_t K, float* emb, float* areas) {
  const int64_t N = hf * wf;
  const Axis ay(hf, H), ax(wf, W);
  const DeviceAxis day(ay, H), dax(ax, W);
  DeviceBuffer<int32_t> d_labels(labels, H * W);
  DeviceBuffer<float> d_features(features, N * D);
  DeviceBuffer<float> d_acc(N * K), d_emb(K * D);
  DeviceBuffer<unsigned long long> d_areas(K);
  d_acc.zero();
  d_areas.zero();

  const size_t shared = static_cast<size_t>(K * wf) * sizeof(float) + K * sizeof(unsigned int);
  const bool use_shared = shared <= kMaxShared;
  segment_weights_kernel<<<static_cast<unsigned>(H), kThreads, use_shared ? shared : 0>>>(
      d_labels.get(), static_cast<int>(W), day.i0.get(), day.i1.get(), day.w0.get(),
      day.w1.get(), dax.i0.get(), dax.i1.get(), dax.w0.get(), dax.w1.get(), static_cast<int>(wf),
      static_cast<int>(K), use_shared, d_acc.get(), d_areas.get());
  check_launch("segment_weights_kernel");

  const dim3 grid(static_cast<unsigned>((D + 127) / 128), static_cast<unsigned>(K));
  weighted_sums_kernel<<<grid, 128>>>(d_acc.get(), d_features.get(), static_cast<int>(N),
                                      static_cast<int>(K), static_cast<int>(D), d_emb.get());
  check_launch("weighted_sums_kernel");

  d_emb.download(emb);
  normalise_rows(emb, K, D);
  std::vector<unsigned long long> counts(K);
  d_areas.download(counts.data());
  for (int64_t k = 0; k < K; ++k) areas[k] = static_cast<float>(counts[k]);
}

}  // namespace cuda
}  // namespace ovseg
