// CUDA label-map rendering: one thread per output pixel, bilinear upsampling
// of the K score maps in the same order as render.cpp, argmax (lowest index
// wins ties), and the overlay from the same blend table.
#include <algorithm>
#include <vector>

#include "bilinear.h"
#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace ovseg {
namespace cuda {
namespace {

constexpr int64_t kMaxLutK = 1024;

template <class T>
__global__ void render_kernel(const float* scores, int K, int h, int w, int H, int W,
                              const int32_t* y0s, const int32_t* y1s, const float* wy0s,
                              const float* wy1s, const int32_t* x0s, const int32_t* x1s,
                              const float* wx0s, const float* wx1s, T* labels,
                              const uint8_t* frame, const uint8_t* palette, const uint8_t* lut,
                              double alpha, uint8_t* overlay) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y;
  if (x >= W) return;
  const int y0 = y0s[y], y1 = y1s[y], x0 = x0s[x], x1 = x1s[x];
  const float a0 = wy0s[y], a1 = wy1s[y], b0 = wx0s[x], b1 = wx1s[x];
  const size_t plane = static_cast<size_t>(h) * w;
  const float* s0 = scores + static_cast<size_t>(y0) * w;
  const float* s1 = scores + static_cast<size_t>(y1) * w;
  float best = 0.0f;
  int arg = 0;
  for (int k = 0; k < K; ++k) {
    const size_t o = k * plane;
    const float r0 = s0[o + x0] * b0 + s0[o + x1] * b1;
    const float r1 = s1[o + x0] * b0 + s1[o + x1] * b1;
    const float v = r0 * a0 + r1 * a1;
    if (k == 0 || v > best) {
      best = v;
      arg = k;
    }
  }
  const size_t p = static_cast<size_t>(y) * W + x;
  labels[p] = static_cast<T>(arg);
  if (!frame) return;
  for (int c = 0; c < 3; ++c) {
    const int f = frame[3 * p + c];
    uint8_t out;
    if (lut) {
      out = lut[(arg * 3 + c) * 256 + f];
    } else {  // blend_value() without contraction, rint = round half to even
      const double v = __dadd_rn(__dmul_rn(1.0 - alpha, f), __dmul_rn(alpha, palette[arg * 3 + c]));
      out = static_cast<uint8_t>(rint(v));
    }
    overlay[3 * p + c] = out;
  }
}

template <class T>
void launch(const RenderArgs& a, const float* scores, const DeviceAxis& day,
            const DeviceAxis& dax, void* labels, const uint8_t* frame, const uint8_t* palette,
            const uint8_t* lut, uint8_t* overlay) {
  const dim3 grid(static_cast<unsigned>((a.out_w + 127) / 128), static_cast<unsigned>(a.out_h));
  render_kernel<T><<<grid, 128>>>(scores, static_cast<int>(a.K), static_cast<int>(a.h),
                                  static_cast<int>(a.w), static_cast<int>(a.out_h),
                                  static_cast<int>(a.out_w), day.i0.get(), day.i1.get(),
                                  day.w0.get(), day.w1.get(), dax.i0.get(), dax.i1.get(),
                                  dax.w0.get(), dax.w1.get(), static_cast<T*>(labels), frame,
                                  palette, lut, a.alpha, overlay);
  check_launch("render_kernel");
}

}  // namespace

void render(const RenderArgs& a) {
  const int64_t pixels = a.out_h * a.out_w;
  const Axis ay(a.h, a.out_h), ax(a.w, a.out_w);
  const DeviceAxis day(ay, a.out_h), dax(ax, a.out_w);
  DeviceBuffer<float> d_scores(a.scores, a.K * a.h * a.w);
  const size_t label_size = a.label_type == LabelType::kInt32 ? 4 : a.label_type == LabelType::kUint16 ? 2 : 1;
  DeviceBuffer<uint8_t> d_labels(pixels * label_size);
  const bool overlay = a.frame != nullptr;
  DeviceBuffer<uint8_t> d_frame(overlay ? pixels * 3 : 0), d_overlay(overlay ? pixels * 3 : 0);
  DeviceBuffer<uint8_t> d_palette(overlay ? a.K * 3 : 0);
  const bool use_lut = overlay && a.K <= kMaxLutK;
  std::vector<uint8_t> lut(use_lut ? a.K * 768 : 0);
  DeviceBuffer<uint8_t> d_lut(lut.size());
  if (overlay) {
    d_frame.upload(a.frame);
    d_palette.upload(a.palette);
  }
  if (use_lut) {
    blend_lut(a.alpha, a.palette, a.K, lut.data());
    d_lut.upload(lut.data());
  }
  const uint8_t* frame = overlay ? d_frame.get() : nullptr;
  const uint8_t* lut_ptr = use_lut ? d_lut.get() : nullptr;
  switch (a.label_type) {
    case LabelType::kInt32:
      launch<int32_t>(a, d_scores.get(), day, dax, d_labels.get(), frame, d_palette.get(), lut_ptr, d_overlay.get());
      break;
    case LabelType::kUint16:
      launch<uint16_t>(a, d_scores.get(), day, dax, d_labels.get(), frame, d_palette.get(), lut_ptr, d_overlay.get());
      break;
    case LabelType::kUint8:
      launch<uint8_t>(a, d_scores.get(), day, dax, d_labels.get(), frame, d_palette.get(), lut_ptr, d_overlay.get());
      break;
  }
  d_labels.download(static_cast<uint8_t*>(a.labels));
  if (overlay) d_overlay.download(a.overlay);
}

}  // namespace cuda
}  // namespace ovseg
