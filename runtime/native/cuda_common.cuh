// Error checking and an owning device buffer for the CUDA kernels.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ovseg {
namespace cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n) check(cudaMalloc(&p_, n * sizeof(T)), "cudaMalloc");
  }
  DeviceBuffer(const T* host, size_t n) : DeviceBuffer(n) { upload(host); }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return p_; }
  void upload(const T* host) {
    if (n_) check(cudaMemcpy(p_, host, n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  void download(T* host) const {
    if (n_) check(cudaMemcpy(host, p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  }
  void zero() {
    if (n_) check(cudaMemset(p_, 0, n_ * sizeof(T)), "cudaMemset");
  }

 private:
  T* p_ = nullptr;
  size_t n_;
};

// Resampling tables of one axis (bilinear.h) on the device.
struct DeviceAxis {
  DeviceBuffer<int32_t> i0, i1;
  DeviceBuffer<float> w0, w1;
  template <class Axis>
  DeviceAxis(const Axis& a, size_t n)
      : i0(a.i0.data(), n), i1(a.i1.data(), n), w0(a.w0.data(), n), w1(a.w1.data(), n) {}
};

inline void check_launch(const char* kernel) {
  check(cudaGetLastError(), kernel);
  check(cudaDeviceSynchronize(), kernel);
}

}  // namespace cuda
}  // namespace ovseg
