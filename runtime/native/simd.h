// Hot loops are plain C++ written so the compiler vectorises them. Wheels must
// run on any x86-64, so instead of -march=native those functions are cloned
// for AVX-512 / AVX2+FMA / baseline and the loader picks one at import time
// (GCC function multiversioning, needs glibc ifunc). Elsewhere — ARM (NEON is
// the baseline there), clang, other libcs, or OVSEG_NATIVE_ARCH builds that
// already target the build machine — the macro is empty.
#pragma once
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(OVSEG_NO_MULTIVERSION)
#define OVSEG_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OVSEG_MULTIVERSION
#endif

namespace ovseg {

// Eight floats: GCC/clang vector extensions (AVX registers in the AVX2/512
// clones, pairs of SSE registers in the baseline one), a plain struct
// elsewhere. The helpers are macros because a helper function would be
// lowered for the baseline instruction set before being inlined into a clone.
#if defined(__GNUC__)
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec8Unaligned __attribute__((vector_size(32), aligned(4)));
#define OVSEG_LOAD8(p) (*reinterpret_cast<const ::ovseg::Vec8Unaligned*>(p))
#define OVSEG_STORE8(p, v) (*reinterpret_cast<::ovseg::Vec8Unaligned*>(p) = (v))
#define OVSEG_SPLAT8(x) ((x) - ::ovseg::Vec8{})
#else
struct Vec8 {
  float v[8] = {};
  Vec8& operator+=(const Vec8& o) {
    for (int i = 0; i < 8; ++i) v[i] += o.v[i];
    return *this;
  }
  friend Vec8 operator*(const Vec8& a, const Vec8& b) {
    Vec8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
};
inline Vec8 load8(const float* p) {
  Vec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
  return r;
}
inline void store8(float* p, const Vec8& v) {
  for (int i = 0; i < 8; ++i) p[i] = v.v[i];
}
inline Vec8 splat8(float x) {
  Vec8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = x;
  return r;
}
#define OVSEG_LOAD8(p) ::ovseg::load8(p)
#define OVSEG_STORE8(p, v) ::ovseg::store8(p, v)
#define OVSEG_SPLAT8(x) ::ovseg::splat8(x)
#endif

}  // namespace ovseg
