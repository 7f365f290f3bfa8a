// Philox4x32-10 for several consecutive counters at once (CPU kernels only).
//
// philox_batch (the sketches' generator, any tag): kLanes = 4 counters in SSE2 registers,
// words in element order: w[4 * lane + k] is word k of counter ctr0 + lane, i.e. the word of
// global index 4 * ctr0 + 4 * lane + k. Same numbers as commcomp::philox4x32_10
// (csrc/ternary.h), with the same optional tag in counter word 2 (csrc/sketch.h's tags).
// SSE2 is part of the x86-64 base ISA, so it needs no CPU dispatch; GCC leaves the scalar
// structure-of-arrays form unvectorized (measured 4x slower).
//
// philox16_sse2 / philox16_avx2 / philox16_avx512 (the ternary codec, spec v2 of
// csrc/ternary.h, tag 0): kDraws16Sse2 / Avx2 / Avx512 = 8 * lanes 16-bit draws of the
// counters ctr0 .. ctr0 + lanes - 1 (4, 8 or 16 lanes): h[e] is the draw of global index
// 8 * ctr0 + e, i.e. half e & 1 (low half first) of word (e >> 1) & 3 of counter
// ctr0 + (e >> 3) -- the words in element order, read as little-endian 16-bit halves. The AVX2
// and AVX-512 versions are compiled for their ISA with a target attribute, so the binary still
// runs on any x86-64; call them only where commcomp::cpu_has_avx2() / cpu_has_avx512() says so
// (csrc/cpu/ternary.cpp dispatches at run time). philox16_portable is the same without SIMD.
#pragma once
#include <cstdint>

#include "../ternary.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define COMMCOMP_X86_DISPATCH 1
#define COMMCOMP_TARGET_AVX2 __attribute__((target("avx2")))
#define COMMCOMP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
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

// The four words of counters ctr0 .. ctr0 + 3, row l = the words of counter ctr0 + l.
inline void philox_sse2(uint64_t ctr0, uint64_t seed, uint32_t tag, __m128i row[4]) {
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
    mulhilo_sse(c0, m0, hi0, lo0);
    mulhilo_sse(c2, m1, hi1, lo1);
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
  row[0] = _mm_unpacklo_epi64(t0, t1);
  row[1] = _mm_unpackhi_epi64(t0, t1);
  row[2] = _mm_unpacklo_epi64(t2, t3);
  row[3] = _mm_unpackhi_epi64(t2, t3);
}
}  // namespace detail

inline void philox_batch(uint64_t ctr0, uint64_t seed, PhiloxBatch& out, uint32_t tag = 0u) {
  __m128i row[4];
  detail::philox_sse2(ctr0, seed, tag, row);
  __m128i* dst = reinterpret_cast<__m128i*>(out.w);
  for (int l = 0; l < 4; ++l) _mm_storeu_si128(dst + l, row[l]);
}
#else
inline void philox_batch(uint64_t ctr0, uint64_t seed, PhiloxBatch& out, uint32_t tag = 0u) {
  for (int l = 0; l < kLanes; ++l) philox4x32_10(ctr0 + l, seed, out.w + 4 * l, tag);
}
#endif

// ---------------------------------------------------------------- ternary codec, spec v2

// One counter without SIMD: h[0 .. 7] = the 8 draws of counter ctr.
inline void philox16_one(uint64_t ctr, uint64_t seed, uint16_t h[8]) {
  uint32_t w[4];
  philox4x32_10(ctr, seed, w);
  for (int k = 0; k < 4; ++k) {
    h[2 * k] = static_cast<uint16_t>(w[k] & 0xFFFFu);
    h[2 * k + 1] = static_cast<uint16_t>(w[k] >> 16);
  }
}

constexpr int kDraws16Portable = 32;
inline void philox16_portable(uint64_t ctr0, uint64_t seed, uint16_t* h) {
  for (int l = 0; l < kDraws16Portable / 8; ++l) philox16_one(ctr0 + l, seed, h + 8 * l);
}

#if defined(__SSE2__)
constexpr int kDraws16Sse2 = 32;
inline void philox16_sse2(uint64_t ctr0, uint64_t seed, uint16_t* h) {
  __m128i row[4];
  detail::philox_sse2(ctr0, seed, 0u, row);
  // Little-endian: the 16-bit halves of a word in element order are (low, high).
  for (int l = 0; l < 4; ++l) _mm_storeu_si128(reinterpret_cast<__m128i*>(h + 8 * l), row[l]);
}
#endif

#if defined(COMMCOMP_X86_DISPATCH)
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
inline bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// Low 32 and high 32 bits of ctr0 + l for each lane l < kN.
template <int kN>
inline void counter_lanes(uint64_t ctr0, uint32_t lo[kN], uint32_t hi[kN]) {
  for (int l = 0; l < kN; ++l) {
    lo[l] = static_cast<uint32_t>(ctr0 + l);
    hi[l] = static_cast<uint32_t>((ctr0 + l) >> 32);
  }
}

namespace detail {
// (hi, lo) of x * m in each 32-bit lane, m broadcast.
COMMCOMP_TARGET_AVX2 inline void mulhilo_avx2(__m256i x, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                       // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

COMMCOMP_TARGET_AVX512 inline void mulhilo_avx512(__m512i x, __m512i m, __m512i& hi,
                                                  __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_mov_epi32(_mm512_srli_epi64(even, 32), 0xAAAA, odd);
  lo = _mm512_mask_mov_epi32(even, 0xAAAA, _mm512_slli_epi64(odd, 32));
}
}  // namespace detail

constexpr int kDraws16Avx2 = 64;
COMMCOMP_TARGET_AVX2 inline void philox16_avx2(uint64_t ctr0, uint64_t seed, uint16_t* h) {
  alignas(32) uint32_t lo[8], hi[8];
  counter_lanes<8>(ctr0, lo, hi);
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();  // tag 0
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    detail::mulhilo_avx2(c0, m0, hi0, lo0);
    detail::mulhilo_avx2(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Per 128-bit half the SSE2 transpose: r_l = (words of lane l | words of lane l + 4).
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpacklo_epi32(c2, c3);
  const __m256i t2 = _mm256_unpackhi_epi32(c0, c1), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i r0 = _mm256_unpacklo_epi64(t0, t1), r1 = _mm256_unpackhi_epi64(t0, t1);
  const __m256i r2 = _mm256_unpacklo_epi64(t2, t3), r3 = _mm256_unpackhi_epi64(t2, t3);
  __m256i* dst = reinterpret_cast<__m256i*>(h);  // 8 draws (16 bytes) per lane
  _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(r0, r1, 0x20));  // lanes 0, 1
  _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(r2, r3, 0x20));  // lanes 2, 3
  _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(r0, r1, 0x31));  // lanes 4, 5
  _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(r2, r3, 0x31));  // lanes 6, 7
}

constexpr int kDraws16Avx512 = 128;
COMMCOMP_TARGET_AVX512 inline void philox16_avx512(uint64_t ctr0, uint64_t seed, uint16_t* h) {
  alignas(64) uint32_t lo[16], hi[16];
  counter_lanes<16>(ctr0, lo, hi);
  __m512i c0 = _mm512_load_si512(lo);
  __m512i c1 = _mm512_load_si512(hi);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();  // tag 0
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    detail::mulhilo_avx512(c0, m0, hi0, lo0);
    detail::mulhilo_avx512(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Per 128-bit quarter q the SSE2 transpose: block q of r_l = the words of lane 4q + l.
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpacklo_epi32(c2, c3);
  const __m512i t2 = _mm512_unpackhi_epi32(c0, c1), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i r0 = _mm512_unpacklo_epi64(t0, t1), r1 = _mm512_unpackhi_epi64(t0, t1);
  const __m512i r2 = _mm512_unpacklo_epi64(t2, t3), r3 = _mm512_unpackhi_epi64(t2, t3);
  // Transpose the 4 x 4 matrix of 128-bit blocks: out_q = (lanes 4q .. 4q + 3).
  const __m512i u0 = _mm512_shuffle_i64x2(r0, r1, _MM_SHUFFLE(1, 0, 1, 0));  // r0.0 r0.1 r1.0 r1.1
  const __m512i u1 = _mm512_shuffle_i64x2(r2, r3, _MM_SHUFFLE(1, 0, 1, 0));  // r2.0 r2.1 r3.0 r3.1
  const __m512i u2 = _mm512_shuffle_i64x2(r0, r1, _MM_SHUFFLE(3, 2, 3, 2));  // r0.2 r0.3 r1.2 r1.3
  const __m512i u3 = _mm512_shuffle_i64x2(r2, r3, _MM_SHUFFLE(3, 2, 3, 2));  // r2.2 r2.3 r3.2 r3.3
  _mm512_storeu_si512(h + 0, _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)));   // 0..3
  _mm512_storeu_si512(h + 32, _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));  // 4..7
  _mm512_storeu_si512(h + 64, _mm512_shuffle_i64x2(u2, u3, _MM_SHUFFLE(2, 0, 2, 0)));  // 8..11
  _mm512_storeu_si512(h + 96, _mm512_shuffle_i64x2(u2, u3, _MM_SHUFFLE(3, 1, 3, 1)));  // 12..15
}
#endif  // COMMCOMP_X86_DISPATCH

}  // namespace commcomp
