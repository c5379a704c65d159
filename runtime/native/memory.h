// Tracked, 64-byte aligned allocations. Every buffer the kernels allocate
// (scratch and outputs) goes through here, so the native peak memory of a call
// can be measured (ovseg._native.peak_allocated_bytes).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

namespace ovseg {

void* tracked_alloc(size_t bytes);  // throws std::bad_alloc
void tracked_free(void* p) noexcept;
// Peak bytes held by tracked allocations since the last reset, above what was
// held at that reset; a reset starts a new measurement.
int64_t tracked_peak_bytes(bool reset);

// Owning array of trivially copyable T.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n, bool zero = false)
      : p_(static_cast<T*>(tracked_alloc(n * sizeof(T)))), n_(n) {
    if (zero) std::memset(static_cast<void*>(p_), 0, n * sizeof(T));
  }
  ~Buffer() { tracked_free(p_); }
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }
  // Hands the memory over; free it with tracked_free.
  T* release() {
    n_ = 0;
    return std::exchange(p_, nullptr);
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace ovseg
