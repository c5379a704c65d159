#include "memory.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#ifdef _WIN32
#include <malloc.h>
#endif

namespace ovseg {
namespace {

constexpr size_t kHeader = 64;  // holds the size, keeps the data 64-byte aligned
std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_base{0};  // bytes held at the last reset

void add(int64_t bytes) {
  const int64_t now = g_current.fetch_add(bytes) + bytes;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

}  // namespace

void* tracked_alloc(size_t bytes) {
  const size_t total = kHeader + ((bytes + 63) / 64) * 64;
#ifdef _WIN32
  void* base = _aligned_malloc(total, 64);
#else
  void* base = std::aligned_alloc(64, total);
#endif
  if (!base) throw std::bad_alloc();
  *static_cast<size_t*>(base) = total;
  add(static_cast<int64_t>(total));
  return static_cast<char*>(base) + kHeader;
}

void tracked_free(void* p) noexcept {
  if (!p) return;
  void* base = static_cast<char*>(p) - kHeader;
  g_current.fetch_sub(static_cast<int64_t>(*static_cast<size_t*>(base)));
#ifdef _WIN32
  _aligned_free(base);
#else
  std::free(base);
#endif
}

int64_t tracked_peak_bytes(bool reset) {
  const int64_t peak = g_peak.load() - g_base.load();
  if (reset) {
    g_base.store(g_current.load());
    g_peak.store(g_base.load());
  }
  return peak;
}

}  // namespace ovseg
