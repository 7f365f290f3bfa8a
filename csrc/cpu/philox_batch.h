// Philox4x32-10 for kLanes consecutive counters at once, words in element order:
// w[4 * lane + k] is word k of counter ctr0 + lane, i.e. the word of global index
// 4 * ctr0 + 4 * lane + k. Same numbers as commcomp::philox4x32_10 (csrc/ternary.h), with the
// same optional tag in counter word 2 (0 for the ternary codec, csrc/sketch.h's for sketches).
// On x86-64 the lanes run in SSE2 registers (part of the base ISA, so no CPU dispatch);
// GCC leaves the scalar structure-of-arrays form unvectorized (measured 4x slower).
#pragma once
#include <cstdint>

#include "../ternary.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace commcomp {

constexpr int kLanes = 4;

struct PhiloxBatch {
  uint32_t w[4 * kLanes];
};

#if defined(__SSE2__)
namespace detail {
// (hi, lo) of x * m in each 32-bit lane.
inline void mulhilo_sse(__m128i x, __m128i m, __m128i& hi, __m128i& lo) {
  const __m128i even = _mm_mul_epu32(x, m);                    // lanes 0, 2 as 64-bit
  const __m128i odd = _mm_mul_epu32(_mm_srli_epi64(x, 32), m);  // lanes 1, 3 as 64-bit
  const __m128i e = _mm_shuffle_epi32(even, _MM_SHUFFLE(3, 1, 2, 0));  // lo0 lo2 hi0 hi2
  const __m128i o = _mm_shuffle_epi32(odd, _MM_SHUFFLE(3, 1, 2, 0));   // lo1 lo3 hi1 hi3
  lo = _mm_unpacklo_epi32(e, o);
  hi = _mm_unpackhi_epi32(e, o);
}
}  // namespace detail

inline void philox_batch(uint64_t ctr0, uint64_t seed, PhiloxBatch& out, uint32_t tag = 0u) {
  const uint64_t c[4] = {ctr0, ctr0 + 1, ctr0 + 2, ctr0 + 3};
  __m128i c0 = _mm_setr_epi32(static_cast<int>(c[0]), static_cast<int>(c[1]),
                              static_cast<int>(c[2]), static_cast<int>(c[3]));
  __m128i c1 = _mm_setr_epi32(static_cast<int>(c[0] >> 32), static_cast<int>(c[1] >> 32),
                              static_cast<int>(c[2] >> 32), static_cast<int>(c[3] >> 32));
  __m128i c2 = _mm_set1_epi32(static_cast<int>(tag)), c3 = _mm_setzero_si128();
  const __m128i m0 = _mm_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m128i m1 = _mm_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m128i hi0, lo0, hi1, lo1;
    detail::mulhilo_sse(c0, m0, hi0, lo0);
    detail::mulhilo_sse(c2, m1, hi1, lo1);
    c0 = _mm_xor_si128(_mm_xor_si128(hi1, c1), _mm_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm_xor_si128(_mm_xor_si128(hi0, c3), _mm_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Transpose (word-major lanes) -> element order.
  const __m128i t0 = _mm_unpacklo_epi32(c0, c1), t1 = _mm_unpacklo_epi32(c2, c3);
  const __m128i t2 = _mm_unpackhi_epi32(c0, c1), t3 = _mm_unpackhi_epi32(c2, c3);
  __m128i* dst = reinterpret_cast<__m128i*>(out.w);
  _mm_storeu_si128(dst + 0, _mm_unpacklo_epi64(t0, t1));
  _mm_storeu_si128(dst + 1, _mm_unpackhi_epi64(t0, t1));
  _mm_storeu_si128(dst + 2, _mm_unpacklo_epi64(t2, t3));
  _mm_storeu_si128(dst + 3, _mm_unpackhi_epi64(t2, t3));
}
#else
inline void philox_batch(uint64_t ctr0, uint64_t seed, PhiloxBatch& out, uint32_t tag = 0u) {
  for (int l = 0; l < kLanes; ++l) philox4x32_10(ctr0 + l, seed, out.w + 4 * l, tag);
}
#endif

}  // namespace commcomp
