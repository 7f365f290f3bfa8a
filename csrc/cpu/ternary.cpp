// CPU kernels of the ternary codec: ternarize (to 2-bit packed bytes, base-3 packed bytes or
// int8 codes), unpack (2-bit and base-3), the fused multi-rank unpack_accumulate, and the send
// side of compressed mixing (mix_encode). The bit-level rules are in csrc/ternary.h and
// csrc/base3.h.
// Ternarize picks its instruction set at run time (SSE2, AVX2 or AVX-512, the best the CPU has;
// COMMCOMP_TERNARY_ISA=sse2|avx2|avx512 or commcomp._C._ternary_isa(name) force one): the
// binary needs nothing beyond x86-64, and every path writes the same bytes.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12 && defined(__x86_64__)
// GCC 12 reports the `__Y = __Y` placeholders inside its own AVX-512 intrinsics as (maybe) used
// uninitialized once they are inlined here (GCC bug 105593, fixed in GCC 13): silence that
// warning for the intrinsics' headers only, by including them first under the pragma.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../base3.h"
#include "../checks.h"
#include "../ternary.h"
#include "decode_tables.h"
#include "philox_batch.h"
#include "segments.h"

namespace commcomp {
namespace {

constexpr int64_t kGrainBytes = 4096;  // 16 Ki elements per task: fixed, so results never
                                       // depend on the number of threads.
constexpr int64_t kTile = 1024;        // elements per unpack_accumulate tile (fits in L1)

// ------------------------------------------------------------------ drawing the codes
//
// The codes of a run of one segment come from batches of kB consecutive 16-bit draws
// (kB / 8 Philox counters per call of the ISA's philox16_*, csrc/cpu/philox_batch.h). The
// instruction set is chosen at run time (TernaryIsa below); every path gives the same bytes.

#if defined(__GNUC__)
#define COMMCOMP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define COMMCOMP_ALWAYS_INLINE inline
#endif

using Gen16 = void (*)(uint64_t ctr0, uint64_t seed, uint16_t* h);
// codes[e] = ternary_code(x[e], s, h[e]) for a whole batch (the ISA's kDraws16* elements).
using Codes = void (*)(const float* x, const uint16_t* h, float s, int8_t* codes);

// The batch loops below restate ternary_code (csrc/ternary.h) lane-wise with the same
// operations, so they give its bits: a = min(|x|, s) as MINPS(s, |x|) = s < |x| ? s : |x|
// (NaN |x| stays NaN; |x| by clearing the sign bit, which changes only -0 into +0, and
// t < -0 equals t < +0); u = h * 2^-16 (exact), t = u * s (one rounding; nothing to fuse);
// nonzero = t < a, ordered (false on NaN); code = nonzero * ((x > 0) - (x < 0)).
#if !defined(__SSE2__)
void codes_portable(const float* x, const uint16_t* h, float s, int8_t* codes) {
  for (int e = 0; e < kDraws16Portable; ++e) {
    codes[e] = static_cast<int8_t>(ternary_code(x[e], s, h[e]));
  }
}
#else
void codes_sse2(const float* x, const uint16_t* h, float s, int8_t* codes) {
  const __m128 sv = _mm_set1_ps(s), step = _mm_set1_ps(kTwoPowMinus16), zero = _mm_setzero_ps();
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
  for (int e = 0; e < kDraws16Sse2; e += 16) {
    __m128i c[4];
    for (int q = 0; q < 4; ++q) {
      const __m128 xv = _mm_loadu_ps(x + e + 4 * q);
      const __m128 a = _mm_min_ps(sv, _mm_and_ps(xv, abs_mask));
      const __m128i hv = _mm_unpacklo_epi16(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(h + e + 4 * q)), _mm_setzero_si128());
      const __m128 t = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(hv), step), sv);
      const __m128 nz = _mm_cmplt_ps(t, a);
      const __m128 pos = _mm_and_ps(nz, _mm_cmpgt_ps(xv, zero));
      const __m128 neg = _mm_and_ps(nz, _mm_cmplt_ps(xv, zero));
      c[q] = _mm_sub_epi32(_mm_castps_si128(neg), _mm_castps_si128(pos));  // -1, 0, +1
    }
    const __m128i b = _mm_packs_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + e), b);
  }
}
#endif

#if defined(COMMCOMP_X86_DISPATCH)
COMMCOMP_TARGET_AVX2 void codes_avx2(const float* x, const uint16_t* h, float s, int8_t* codes) {
  const __m256 sv = _mm256_set1_ps(s), step = _mm256_set1_ps(kTwoPowMinus16);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lanes
  for (int e = 0; e < kDraws16Avx2; e += 32) {
    __m256i c[4];
    for (int q = 0; q < 4; ++q) {
      const __m256 xv = _mm256_loadu_ps(x + e + 8 * q);
      const __m256 a = _mm256_min_ps(sv, _mm256_and_ps(xv, abs_mask));
      const __m256i hv = _mm256_cvtepu16_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + e + 8 * q)));
      const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hv), step), sv);
      const __m256 nz = _mm256_cmp_ps(t, a, _CMP_LT_OQ);
      const __m256 pos = _mm256_and_ps(nz, _mm256_cmp_ps(xv, zero, _CMP_GT_OQ));
      const __m256 neg = _mm256_and_ps(nz, _mm256_cmp_ps(xv, zero, _CMP_LT_OQ));
      c[q] = _mm256_sub_epi32(_mm256_castps_si256(neg), _mm256_castps_si256(pos));
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                         _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + e),
                        _mm256_permutevar8x32_epi32(b, order));
  }
}

COMMCOMP_TARGET_AVX512 void codes_avx512(const float* x, const uint16_t* h, float s,
                                         int8_t* codes) {
  const __m512 sv = _mm512_set1_ps(s), step = _mm512_set1_ps(kTwoPowMinus16);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m128i plus1 = _mm_set1_epi8(1), minus1 = _mm_set1_epi8(-1);
  for (int e = 0; e < kDraws16Avx512; e += 16) {
    const __m512 xv = _mm512_loadu_ps(x + e);
    const __m512 ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(xv), abs_mask));
    const __m512 a = _mm512_min_ps(sv, ax);
    const __m512i hv = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + e)));
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hv), step), sv);
    const __mmask16 nz = _mm512_cmp_ps_mask(t, a, _CMP_LT_OQ);
    const __mmask16 pos = _mm512_mask_cmp_ps_mask(nz, xv, zero, _CMP_GT_OQ);
    const __mmask16 neg = _mm512_mask_cmp_ps_mask(nz, xv, zero, _CMP_LT_OQ);
    const __m128i c = _mm_mask_mov_epi8(_mm_maskz_mov_epi8(pos, plus1), neg, minus1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + e), c);
  }
}
#endif

// Codes of x[0, len) (one segment, scale s), global index of x[0] = g0. Whole batches start
// at a multiple of 8 (inputs other than float are converted to float first, batch by batch);
// a misaligned head takes the rest of its batch and a tail what is left, through the batch
// code on a zero-padded copy; a piece that fits in one counter (a short segment or tail) draws
// just that counter and goes element by element.
template <int kB, Gen16 kGen, Codes kCodes, typename scalar_t>
COMMCOMP_ALWAYS_INLINE void ternary_run_body(const scalar_t* x, int64_t len, float s,
                                             uint64_t seed, uint64_t g0, int8_t* codes) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  alignas(64) uint16_t h[kB];
  alignas(64) float xf[kFloat ? 1 : kB];
  int64_t i = 0;
  while (i < len) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    const int skip = static_cast<int>(g & 7u);
    if (skip == 0 && len - i >= kB) {
      kGen(g >> 3, seed, h);
      if constexpr (kFloat) {
        kCodes(x + i, h, s, codes + i);
      } else {
        for (int e = 0; e < kB; ++e) xf[e] = static_cast<float>(x[i + e]);
        kCodes(xf, h, s, codes + i);
      }
      i += kB;
      continue;
    }
    const int64_t take = std::min<int64_t>(len - i, kB - skip);
    if (skip + take <= 8) {
      philox16_one(g >> 3, seed, h);
      for (int64_t e = 0; e < take; ++e) {
        const float v = static_cast<float>(x[i + e]);
        codes[i + e] = static_cast<int8_t>(ternary_code(v, s, h[skip + e]));
      }
    } else {
      // Part of a batch: the batch's draws, and the batch's codes of a copy of x padded with
      // zeros (lanes are independent, so the taken ones are those of ternary_code).
      kGen(g >> 3, seed, h);
      alignas(64) float xp[kB];
      alignas(64) int8_t cp[kB];
      for (int e = 0; e < kB; ++e) xp[e] = 0.f;
      for (int64_t e = 0; e < take; ++e) xp[skip + e] = static_cast<float>(x[i + e]);
      kCodes(xp, h, s, cp);
      std::memcpy(codes + i, cp + skip, static_cast<size_t>(take));
    }
    i += take;
  }
}

// Packs codes c[0, 4 * nbytes) four to a byte (encode2 of each, element 4j + k in bits 2k..):
// per byte of the little-endian word, 0 -> 0b00, +1 (0x01) -> 0b01, -1 (0xFF) -> 0b11 -> 0b10.
COMMCOMP_ALWAYS_INLINE void pack_body(const int8_t* c, int64_t nbytes, uint8_t* out) {
  for (int64_t b = 0; b < nbytes; ++b) {
    uint32_t v;
    std::memcpy(&v, c + 4 * b, 4);
    uint32_t t = v & 0x03030303u;
    t ^= (t >> 1) & 0x01010101u;
    out[b] = static_cast<uint8_t>(t | (t >> 6) | (t >> 12) | (t >> 18));
  }
}

// Packs codes c[0, 5 * nbytes) five to a byte (csrc/base3.h); reads c up to c[5 * nbytes + 2]
// (those last three only reach bits that are discarded). Per byte, as the little-endian word
// w of c[5k .. 5k + 7]: the digits c + 1 lane-wise, without carries between bytes
// (0xFF -> 0, 0 -> 1, 1 -> 2); then byte 4 of w * M, M = (81, 27, 9, 3, 1) in bytes 0..4, is
// d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4 <= 242: bytes 0..3 of the product sum to at most 162, 216,
// 234 and 240, so nothing carries into byte 4, and bytes 5.. of w only reach bytes 5.. of it.
COMMCOMP_ALWAYS_INLINE void pack5_body(const int8_t* c, int64_t nbytes, uint8_t* out) {
  for (int64_t k = 0; k < nbytes; ++k) {
    uint64_t w;
    std::memcpy(&w, c + 5 * k, 8);
    w = ((w & 0x7F7F7F7F7F7F7F7Full) + 0x0101010101010101ull) ^ (w & 0x8080808080808080ull);
    out[k] = static_cast<uint8_t>((w * 0x0103091B51ull) >> 32);
  }
}

template <typename scalar_t>
using RunFn = void (*)(const scalar_t*, int64_t, float, uint64_t, uint64_t, int8_t*);
using PackFn = void (*)(const int8_t*, int64_t, uint8_t*);

// The baseline path: SSE2 (part of x86-64), or portable C++ elsewhere.
#if defined(__SSE2__)
constexpr int kBaseDraws = kDraws16Sse2;
constexpr Gen16 kBaseGen = &philox16_sse2;
constexpr Codes kBaseCodes = &codes_sse2;
#else
constexpr int kBaseDraws = kDraws16Portable;
constexpr Gen16 kBaseGen = &philox16_portable;
constexpr Codes kBaseCodes = &codes_portable;
#endif
template <typename scalar_t>
void run_base(const scalar_t* x, int64_t len, float s, uint64_t seed, uint64_t g0,
              int8_t* codes) {
  ternary_run_body<kBaseDraws, kBaseGen, kBaseCodes>(x, len, s, seed, g0, codes);
}
void pack_base(const int8_t* c, int64_t nbytes, uint8_t* out) { pack_body(c, nbytes, out); }
void pack5_base(const int8_t* c, int64_t nbytes, uint8_t* out) { pack5_body(c, nbytes, out); }

#if defined(COMMCOMP_X86_DISPATCH)
template <typename scalar_t>
COMMCOMP_TARGET_AVX2 void run_avx2(const scalar_t* x, int64_t len, float s, uint64_t seed,
                                   uint64_t g0, int8_t* codes) {
  ternary_run_body<kDraws16Avx2, philox16_avx2, codes_avx2>(x, len, s, seed, g0, codes);
}
// pack_body 64 codes (16 bytes) at a time: field e = min(c & 3, 2) (0 -> 0, 1 -> 1, -1 -> 2),
// then e0 + 4 e1 per pair of bytes (maddubs) and (e0 + 4 e1) + 16 (e2 + 4 e3) per word (madd).
COMMCOMP_TARGET_AVX2 void pack_avx2(const int8_t* c, int64_t nbytes, uint8_t* out) {
  const __m256i two = _mm256_set1_epi8(2), three = _mm256_set1_epi8(3);
  const __m256i w14 = _mm256_set1_epi16(0x0401);       // bytes (1, 4)
  const __m256i w116 = _mm256_set1_epi32(0x00100001);  // words (1, 16)
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lanes
  int64_t b = 0;
  for (; b + 16 <= nbytes; b += 16) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 4 * b));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 4 * b + 32));
    const __m256i e0 = _mm256_min_epu8(_mm256_and_si256(v0, three), two);
    const __m256i e1 = _mm256_min_epu8(_mm256_and_si256(v1, three), two);
    const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(e0, w14), w116);
    const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(e1, w14), w116);
    const __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(p0, p1), _mm256_setzero_si256());
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(x, order)));
  }
  pack_body(c + 4 * b, nbytes - b, out + b);
}

// pack5_body 20 codes (4 bytes) at a time: the two groups of five in each 10 codes moved to
// bytes 0..4 and 8..12 of a 128-bit lane, digits c + 1 weighted by (1, 3, 9, 27, 81, 0, 0, 0)
// and summed per 64 bits (maddubs, madd, then the two words). Reads c[0, 5 * nbytes + 6).
COMMCOMP_TARGET_AVX2 void pack5_avx2(const int8_t* c, int64_t nbytes, uint8_t* out) {
  const __m256i one = _mm256_set1_epi8(1);
  const __m256i spread = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, 1, 2, 3, 4, -1, -1, -1, 5, 6, 7, 8, 9, -1, -1, -1));
  const __m256i weights = _mm256_set1_epi64x(0x000000511B090301ll);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i gather = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  int64_t b = 0;
  for (; b + 4 <= nbytes; b += 4) {
    const int8_t* p = c + 5 * b;
    const __m256i v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 10)), 1);
    const __m256i d = _mm256_add_epi8(_mm256_shuffle_epi8(v, spread), one);
    const __m256i q = _mm256_madd_epi16(_mm256_maddubs_epi16(d, weights), ones16);
    const __m256i r = _mm256_shuffle_epi8(_mm256_add_epi32(q, _mm256_srli_epi64(q, 32)), gather);
    const uint32_t lo = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(r)));
    const uint32_t hi = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(r, 1)));
    const uint32_t word = (lo & 0xFFFFu) | (hi << 16);
    std::memcpy(out + b, &word, 4);
  }
  pack5_body(c + 5 * b, nbytes - b, out + b);
}
template <typename scalar_t>
COMMCOMP_TARGET_AVX512 void run_avx512(const scalar_t* x, int64_t len, float s,
                                       uint64_t seed, uint64_t g0, int8_t* codes) {
  ternary_run_body<kDraws16Avx512, philox16_avx512, codes_avx512>(x, len, s, seed, g0, codes);
}
// pack_avx2's steps, 64 codes at a time.
COMMCOMP_TARGET_AVX512 void pack_avx512(const int8_t* c, int64_t nbytes, uint8_t* out) {
  const __m512i two = _mm512_set1_epi8(2), three = _mm512_set1_epi8(3);
  const __m512i w14 = _mm512_set1_epi16(0x0401);
  const __m512i w116 = _mm512_set1_epi32(0x00100001);
  int64_t b = 0;
  for (; b + 16 <= nbytes; b += 16) {
    const __m512i v = _mm512_loadu_si512(c + 4 * b);
    const __m512i e = _mm512_min_epu8(_mm512_and_si512(v, three), two);
    const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(e, w14), w116);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + b), _mm512_cvtepi32_epi8(p));
  }
  pack_body(c + 4 * b, nbytes - b, out + b);
}

// pack5_avx2's steps, 40 codes (8 bytes) at a time. Reads c[0, 5 * nbytes + 6).
COMMCOMP_TARGET_AVX512 void pack5_avx512(const int8_t* c, int64_t nbytes, uint8_t* out) {
  const __m512i one = _mm512_set1_epi8(1);
  const __m512i spread = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 2, 3, 4, -1, -1, -1, 5, 6, 7, 8, 9, -1, -1, -1));
  const __m512i weights = _mm512_set1_epi64(0x000000511B090301ll);
  const __m512i ones16 = _mm512_set1_epi16(1);
  int64_t b = 0;
  for (; b + 8 <= nbytes; b += 8) {
    const int8_t* p = c + 5 * b;
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 10)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 30)), 3);
    const __m512i d = _mm512_add_epi8(_mm512_shuffle_epi8(v, spread), one);
    const __m512i q = _mm512_madd_epi16(_mm512_maddubs_epi16(d, weights), ones16);
    const __m512i r = _mm512_add_epi32(q, _mm512_srli_epi64(q, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + b), _mm512_cvtepi64_epi8(r));
  }
  pack5_body(c + 5 * b, nbytes - b, out + b);
}
#endif

// Run-time choice of the instruction set. The best one the CPU has is used unless the
// environment variable COMMCOMP_TERNARY_ISA names another (read at the first call), or
// commcomp._C._ternary_isa(name) sets one (tests compare the paths).
enum TernaryIsa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaCount = 3 };
#if defined(__SSE2__)
constexpr const char* kIsaNames[kIsaCount] = {"sse2", "avx2", "avx512"};
#else
constexpr const char* kIsaNames[kIsaCount] = {"portable", "avx2", "avx512"};
#endif

bool isa_supported(int isa) {
#if defined(COMMCOMP_X86_DISPATCH)
  if (isa == kIsaAvx2) return cpu_has_avx2();
  if (isa == kIsaAvx512) return cpu_has_avx512();
#endif
  return isa == kIsaBase;
}

int isa_by_name(const char* name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) return i;
  }
  return -1;
}

std::string supported_isa_list() {
  std::string out;
  for (int i = 0; i < kIsaCount; ++i) {
    if (!isa_supported(i)) continue;
    if (!out.empty()) out += ", ";
    out += kIsaNames[i];
  }
  return out;
}

int initial_isa() {
  const char* env = std::getenv("COMMCOMP_TERNARY_ISA");
  if (env != nullptr && *env != '\0') {
    const int isa = isa_by_name(env);
    TORCH_CHECK(isa >= 0 && isa_supported(isa), "commcomp: COMMCOMP_TERNARY_ISA=", env,
                " is not an instruction set of the ternary kernels this CPU runs (",
                supported_isa_list(), "); unset it to pick the best one");
    return isa;
  }
  for (int i = kIsaCount - 1; i > kIsaBase; --i) {
    if (isa_supported(i)) return i;
  }
  return kIsaBase;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = initial_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

template <typename scalar_t>
RunFn<scalar_t> run_fn(int isa) {
#if defined(COMMCOMP_X86_DISPATCH)
  if (isa == kIsaAvx512) return &run_avx512<scalar_t>;
  if (isa == kIsaAvx2) return &run_avx2<scalar_t>;
#endif
  (void)isa;
  return &run_base<scalar_t>;
}

PackFn pack_fn(int isa) {
#if defined(COMMCOMP_X86_DISPATCH)
  if (isa == kIsaAvx512) return &pack_avx512;
  if (isa == kIsaAvx2) return &pack_avx2;
#endif
  (void)isa;
  return &pack_base;
}

PackFn pack5_fn(int isa) {
#if defined(COMMCOMP_X86_DISPATCH)
  if (isa == kIsaAvx512) return &pack5_avx512;
  if (isa == kIsaAvx2) return &pack5_avx2;
#endif
  (void)isa;
  return &pack5_base;
}

constexpr int64_t kPackBlock = 8192;  // pack mode: codes staged per block (L1), then packed

template <typename scalar_t, bool kPack>
void ternarize_impl(const scalar_t* x, int64_t n, const float* scales,
                    const std::vector<int64_t>& off, uint64_t seed, uint64_t offset,
                    uint8_t* packed, int8_t* codes) {
  const int isa = current_isa();
  const RunFn<scalar_t> run = run_fn<scalar_t>(isa);
  const PackFn pack = pack_fn(isa);
  at::parallel_for(0, packed_bytes(n), kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t i_begin = b0 * 4, i_end = std::min(b1 * 4, n);
    // Pack mode draws a block of codes into `local`, then packs it (blocks start at a
    // multiple of 4); int8 mode draws the whole task in place.
    alignas(64) int8_t local[kPack ? kPackBlock + 4 : 1];
    const int64_t step = kPack ? kPackBlock : i_end - i_begin;
    SegmentCursor seg(off, i_begin);
    for (int64_t blk = i_begin; blk < i_end; blk += step) {
      const int64_t blk_end = std::min(blk + step, i_end);
      int8_t* dst = kPack ? local : codes + blk;  // dst[i - blk] <-> x[i]
      for (int64_t i = blk; i < blk_end;) {
        const float s = scales[seg.at(i)];
        const int64_t stop = std::min(blk_end, seg.end());
        run(x + i, stop - i, s, seed, offset + static_cast<uint64_t>(i), dst + (i - blk));
        i = stop;
      }
      if (kPack) {
        for (int64_t j = blk_end - blk; j < kPackBlock + 4 && (j & 3); ++j) local[j] = 0;
        pack(local, (blk_end - blk + 3) / 4, packed + blk / 4);
      }
    }
  });
}

at::Tensor ternarize_cpu(const at::Tensor& x, const at::Tensor& scales,
                         at::OptionalIntArrayRef segments, int64_t seed, int64_t offset,
                         bool pack) {
  const auto off = check_ternarize_args(x, scales, segments, seed, offset);
  const int64_t n = x.numel();
  at::Tensor out = pack ? at::empty({packed_bytes(n)}, x.options().dtype(at::kByte))
                        : at::empty({n}, x.options().dtype(at::kChar));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternarize", [&] {
    if (pack) {
      ternarize_impl<scalar_t, true>(x.const_data_ptr<scalar_t>(), n,
                                     scales.const_data_ptr<float>(), off, seed, offset,
                                     out.mutable_data_ptr<uint8_t>(), nullptr);
    } else {
      ternarize_impl<scalar_t, false>(x.const_data_ptr<scalar_t>(), n,
                                      scales.const_data_ptr<float>(), off, seed, offset,
                                      nullptr, out.mutable_data_ptr<int8_t>());
    }
  });
  return out;
}

at::Tensor ternarize_pack_cpu(const at::Tensor& x, const at::Tensor& scales,
                              at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cpu(x, scales, segments, seed, offset, /*pack=*/true);
}

at::Tensor ternarize_int8_cpu(const at::Tensor& x, const at::Tensor& scales,
                              at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cpu(x, scales, segments, seed, offset, /*pack=*/false);
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t numel, const at::Tensor& scales,
                      at::OptionalIntArrayRef segments, at::ScalarType dtype) {
  const auto off = check_unpack_args(packed, numel, scales, segments, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, packed_bytes(numel), kGrainBytes, [&](int64_t b0, int64_t b1) {
      const int64_t i_end = std::min(b1 * 4, numel);
      SegmentCursor seg(off, b0 * 4);
      for (int64_t i = b0 * 4; i < i_end;) {
        const float s = sc[seg.at(i)];
        const int64_t stop = std::min(i_end, seg.end());
        for (; i < stop && (i & 3); ++i) {
          o[i] = static_cast<scalar_t>(kDecodeTable.v[p[i >> 2]][i & 3] * s);
        }
        for (; i + 4 <= stop; i += 4) {  // whole bytes
          const float* c = kDecodeTable.v[p[i >> 2]];
          for (int k = 0; k < 4; ++k) o[i + k] = static_cast<scalar_t>(c[k] * s);
        }
        for (; i < stop; ++i) {
          o[i] = static_cast<scalar_t>(kDecodeTable.v[p[i >> 2]][i & 3] * s);
        }
      }
    });
  });
  return out;
}

void unpack_accumulate_cpu(const at::Tensor& packed, const at::Tensor& scales,
                           at::OptionalIntArrayRef segments, const at::Tensor& out) {
  const auto off = check_unpack_accumulate_args(packed, scales, segments, out);
  const int64_t numel = out.numel(), rows = packed.size(0);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  if (numel == 0 || rows == 0) return;
  const int64_t nbytes = packed_bytes(numel);
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unpack_acc", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (numel + kTile - 1) / kTile, 4, [&](int64_t t0, int64_t t1) {
      float acc[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * kTile, i1 = std::min(i0 + kTile, numel);
        std::fill(acc, acc + (i1 - i0), 0.f);
        // Rank by rank, in order: acc = ((0 + s_0 c_0) + s_1 c_1) + ..., then out += acc.
        for (int64_t w = 0; w < rows; ++w) {
          const uint8_t* pw = p + w * nbytes;
          const float* sw = sc + w * nseg;
          SegmentCursor seg(off, i0);
          for (int64_t i = i0; i < i1;) {
            const float s = sw[seg.at(i)];
            const int64_t stop = std::min(i1, seg.end());
            for (; i < stop && (i & 3); ++i) {
              acc[i - i0] += decode2(pw[i >> 2], static_cast<int>(i & 3)) * s;
            }
            for (; i + 4 <= stop; i += 4) {  // whole bytes: four fields from the table
              const float* c = kDecodeTable.v[pw[i >> 2]];
              float* a = acc + (i - i0);
              a[0] += c[0] * s;
              a[1] += c[1] * s;
              a[2] += c[2] * s;
              a[3] += c[3] * s;
            }
            for (; i < stop; ++i) {
              acc[i - i0] += decode2(pw[i >> 2], static_cast<int>(i & 3)) * s;
            }
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          o[i] = static_cast<scalar_t>(static_cast<float>(o[i]) + acc[i - i0]);
        }
      }
    });
  });
}

// ------------------------------------------------------------------ base-3 packing, mix_encode
//
// Work is cut into units of kUnit elements: a multiple of 5 (a base-3 byte), of 4 (a 2-bit
// byte), of 8 (a Philox counter) and of 128 (the widest batch of draws), so every task and
// every block starts on a whole byte of either packing and on a whole batch. The bytes do not
// depend on the cut (each code depends only on its global index), the cut only on n.
constexpr int64_t kUnit = 640;
constexpr int64_t kGrainUnits = 26;          // 16640 elements per task (ternarize_pack: 16384)
constexpr int64_t kBase3Block = 13 * kUnit;  // 8320 codes staged per block (L1), then packed
constexpr int64_t kEncodeBlock = 4 * kUnit;  // mix_encode: 2560 codes staged per block
constexpr int64_t kPack5Slack = 16;          // pack5_*: reads up to 6 codes past the last byte
static_assert(kUnit % 40 == 0 && kUnit % kBaseDraws == 0, "units hold whole bytes and batches");
#if defined(COMMCOMP_X86_DISPATCH)
static_assert(kUnit % kDraws16Avx512 == 0 && kUnit % kDraws16Avx2 == 0, "whole batches");
#endif

// The codes of x[blk, blk_end) (xb[0] is x[blk]) into dst[0, blk_end - blk), run by run of
// one segment each.
template <typename scalar_t>
COMMCOMP_ALWAYS_INLINE void draw_block(RunFn<scalar_t> run, const scalar_t* xb, int64_t blk,
                                       int64_t blk_end, const float* scales,
                                       SegmentCursor& seg, uint64_t seed, uint64_t offset,
                                       int8_t* dst) {
  for (int64_t i = blk; i < blk_end;) {
    const float s = scales[seg.at(i)];
    const int64_t stop = std::min(blk_end, seg.end());
    run(xb + (i - blk), stop - i, s, seed, offset + static_cast<uint64_t>(i), dst + (i - blk));
    i = stop;
  }
}

template <typename scalar_t>
void ternarize_base3_impl(const scalar_t* x, int64_t n, const float* scales,
                          const std::vector<int64_t>& off, uint64_t seed, uint64_t offset,
                          uint8_t* out) {
  const int isa = current_isa();
  const RunFn<scalar_t> run = run_fn<scalar_t>(isa);
  const PackFn pack5 = pack5_fn(isa);
  at::parallel_for(0, (n + kUnit - 1) / kUnit, kGrainUnits, [&](int64_t u0, int64_t u1) {
    const int64_t i_begin = u0 * kUnit, i_end = std::min(u1 * kUnit, n);
    alignas(64) int8_t local[kBase3Block + kPack5Slack];
    std::memset(local + kBase3Block, 0, kPack5Slack);  // read (and discarded) by pack5
    SegmentCursor seg(off, i_begin);
    for (int64_t blk = i_begin; blk < i_end; blk += kBase3Block) {
      const int64_t blk_end = std::min(blk + kBase3Block, i_end);
      draw_block(run, x + blk, blk, blk_end, scales, seg, seed, offset, local);
      const int64_t len = blk_end - blk, nbytes = (len + 4) / 5;
      for (int64_t j = len; j < 5 * nbytes; ++j) local[j] = 0;  // padding: code 0
      pack5(local, nbytes, out + blk / 5);
    }
  });
}

at::Tensor ternarize_base3_cpu(const at::Tensor& x, const at::Tensor& scales,
                               at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  const auto off = check_ternarize_args(x, scales, segments, seed, offset);
  const int64_t n = x.numel();
  at::Tensor out = at::empty({base3_bytes(n)}, x.options().dtype(at::kByte));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternarize3", [&] {
    ternarize_base3_impl<scalar_t>(x.const_data_ptr<scalar_t>(), n,
                                   scales.const_data_ptr<float>(), off, seed, offset,
                                   out.mutable_data_ptr<uint8_t>());
  });
  return out;
}

at::Tensor unpack_base3_cpu(const at::Tensor& packed, int64_t numel, const at::Tensor& scales,
                            at::OptionalIntArrayRef segments, at::ScalarType dtype) {
  const auto off = check_unpack_base3_args(packed, numel, scales, segments, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_base3", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (numel + kUnit - 1) / kUnit, kGrainUnits, [&](int64_t u0, int64_t u1) {
      const int64_t i_begin = u0 * kUnit, i_end = std::min(u1 * kUnit, numel);
      alignas(64) float codes[kUnit + 8];  // expand_base3 writes 3 past the last byte's codes
      SegmentCursor seg(off, i_begin);
      for (int64_t blk = i_begin; blk < i_end; blk += kUnit) {
        const int64_t blk_end = std::min(blk + kUnit, i_end);
        expand_base3(p + blk / 5, base3_bytes(blk_end - blk), codes);
        for (int64_t i = blk; i < blk_end;) {
          const float s = sc[seg.at(i)];
          const int64_t stop = std::min(blk_end, seg.end());
          for (; i < stop; ++i) o[i] = static_cast<scalar_t>(codes[i - blk] * s);
        }
      }
    });
  });
  return out;
}

// mix_encode: d = v - hat; code = the ternary code of d (0 where d is not finite, and there
// v = hat, the estimate before this update); hat += code * hat_scale; acc += code * acc_scale;
// the codes packed (2-bit or base-3). One pass: batch by batch (the ISA's kB elements, one call
// of its Philox), v, hat and acc are loaded, updated and stored while the draws are in
// registers, so the memory traffic runs alongside Philox. (Separate passes over a block for d,
// the codes and the update measured 1.65x ternarize_int8's time single-threaded, fused 1.4x.)
struct EncodeArgs {
  float* v;
  float* hat;
  float* acc;
  const float* scales;
  const float* hat_scales;
  const float* acc_scales;
  const std::vector<int64_t>* off;
  uint64_t seed;
  uint64_t offset;
  bool base3;
  uint8_t* out;
};

// One batch of the ISA's kB elements with draws hd (segment scales s, hs, as).
using EncodeBatch = void (*)(float* v, float* hat, float* acc, const uint16_t* hd, float s,
                             float hs, float as, int8_t* codes);

// One element: the rules of the reference, which the batches restate lane-wise. The codes'
// lane-wise steps are those of codes_* above (ternary_code's bits); code * scale is exact
// (code in {-1, 0, 1}), so a fused multiply-add gives the same bits, 0 * Inf is NaN either way,
// and a code 0 still adds +0 (turning -0 into +0), as the reference's add does.
COMMCOMP_ALWAYS_INLINE void encode_one(float& v, float& hat, float& acc, float s, float hs,
                                       float as, uint32_t h, int8_t& code) {
  float d = v - hat;
  uint32_t bits;
  std::memcpy(&bits, &d, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u) {  // not finite: code 0, and v falls back to hat
    d = 0.f;
    v = hat;
  }
  const int c = ternary_code(d, s, h);
  const float cf = static_cast<float>(c);
  hat = hat + cf * hs;
  acc = acc + cf * as;
  code = static_cast<int8_t>(c);
}

// Lane-wise: d = v - hat; not finite <=> |d| (sign bit cleared) > FLT_MAX as an integer;
// dz = d with those lanes +0 (code 0), and v = hat there (stored only when a lane needs it).
#if !defined(__SSE2__)
void encode_batch_portable(float* v, float* hat, float* acc, const uint16_t* hd, float s,
                           float hs, float as, int8_t* codes) {
  for (int e = 0; e < kDraws16Portable; ++e) {
    encode_one(v[e], hat[e], acc[e], s, hs, as, hd[e], codes[e]);
  }
}
#else
void encode_batch_sse2(float* v, float* hat, float* acc, const uint16_t* hd, float s, float hs,
                       float as, int8_t* codes) {
  const __m128 sv = _mm_set1_ps(s), step = _mm_set1_ps(kTwoPowMinus16), zero = _mm_setzero_ps();
  const __m128 hsv = _mm_set1_ps(hs), asv = _mm_set1_ps(as);
  const __m128 one = _mm_set1_ps(1.f), minus_one = _mm_set1_ps(-1.f);
  const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), max_finite = _mm_set1_epi32(0x7F7FFFFF);
  for (int e = 0; e < kDraws16Sse2; e += 16) {
    __m128i c[4];
    for (int q = 0; q < 4; ++q) {
      const int o = e + 4 * q;
      const __m128 vv = _mm_loadu_ps(v + o), hv = _mm_loadu_ps(hat + o);
      const __m128 av = _mm_loadu_ps(acc + o);
      const __m128 d = _mm_sub_ps(vv, hv);
      const __m128i ad = _mm_and_si128(_mm_castps_si128(d), abs_mask);
      const __m128 nf = _mm_castsi128_ps(_mm_cmpgt_epi32(ad, max_finite));
      if (_mm_movemask_ps(nf) != 0) {
        _mm_storeu_ps(v + o, _mm_or_ps(_mm_and_ps(nf, hv), _mm_andnot_ps(nf, vv)));
      }
      const __m128 dz = _mm_andnot_ps(nf, d);
      const __m128 a = _mm_min_ps(sv, _mm_andnot_ps(nf, _mm_castsi128_ps(ad)));  // min(|dz|, s)
      const __m128i hw = _mm_unpacklo_epi16(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(hd + o)), _mm_setzero_si128());
      const __m128 t = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(hw), step), sv);
      const __m128 nz = _mm_cmplt_ps(t, a);
      const __m128 pos = _mm_and_ps(nz, _mm_cmpgt_ps(dz, zero));
      const __m128 neg = _mm_and_ps(nz, _mm_cmplt_ps(dz, zero));
      c[q] = _mm_sub_epi32(_mm_castps_si128(neg), _mm_castps_si128(pos));  // -1, 0, +1
      const __m128 cf = _mm_or_ps(_mm_and_ps(pos, one), _mm_and_ps(neg, minus_one));
      _mm_storeu_ps(hat + o, _mm_add_ps(hv, _mm_mul_ps(cf, hsv)));
      _mm_storeu_ps(acc + o, _mm_add_ps(av, _mm_mul_ps(cf, asv)));
    }
    const __m128i b = _mm_packs_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + e), b);
  }
}
#endif

#if defined(COMMCOMP_X86_DISPATCH)
COMMCOMP_TARGET_AVX2 void encode_batch_avx2(float* v, float* hat, float* acc, const uint16_t* hd,
                                            float s, float hs, float as, int8_t* codes) {
  const __m256 sv = _mm256_set1_ps(s), step = _mm256_set1_ps(kTwoPowMinus16);
  const __m256 zero = _mm256_setzero_ps(), hsv = _mm256_set1_ps(hs), asv = _mm256_set1_ps(as);
  const __m256 one = _mm256_set1_ps(1.f), minus_one = _mm256_set1_ps(-1.f);
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i max_finite = _mm256_set1_epi32(0x7F7FFFFF);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lanes
  for (int e = 0; e < kDraws16Avx2; e += 32) {
    __m256i c[4];
    for (int q = 0; q < 4; ++q) {
      const int o = e + 8 * q;
      const __m256 vv = _mm256_loadu_ps(v + o), hv = _mm256_loadu_ps(hat + o);
      const __m256 av = _mm256_loadu_ps(acc + o);
      const __m256 d = _mm256_sub_ps(vv, hv);
      const __m256i ad = _mm256_and_si256(_mm256_castps_si256(d), abs_mask);
      const __m256i nfi = _mm256_cmpgt_epi32(ad, max_finite);
      const __m256 nf = _mm256_castsi256_ps(nfi);
      if (!_mm256_testz_si256(nfi, nfi)) _mm256_storeu_ps(v + o, _mm256_blendv_ps(vv, hv, nf));
      const __m256 dz = _mm256_andnot_ps(nf, d);
      const __m256 a = _mm256_min_ps(sv, _mm256_andnot_ps(nf, _mm256_castsi256_ps(ad)));
      const __m256i hw = _mm256_cvtepu16_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(hd + o)));
      const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hw), step), sv);
      const __m256 nz = _mm256_cmp_ps(t, a, _CMP_LT_OQ);
      const __m256 pos = _mm256_and_ps(nz, _mm256_cmp_ps(dz, zero, _CMP_GT_OQ));
      const __m256 neg = _mm256_and_ps(nz, _mm256_cmp_ps(dz, zero, _CMP_LT_OQ));
      c[q] = _mm256_sub_epi32(_mm256_castps_si256(neg), _mm256_castps_si256(pos));
      const __m256 cf = _mm256_or_ps(_mm256_and_ps(pos, one), _mm256_and_ps(neg, minus_one));
      _mm256_storeu_ps(hat + o, _mm256_add_ps(hv, _mm256_mul_ps(cf, hsv)));
      _mm256_storeu_ps(acc + o, _mm256_add_ps(av, _mm256_mul_ps(cf, asv)));
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                         _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + e),
                        _mm256_permutevar8x32_epi32(b, order));
  }
}

COMMCOMP_TARGET_AVX512 void encode_batch_avx512(float* v, float* hat, float* acc,
                                                const uint16_t* hd, float s, float hs, float as,
                                                int8_t* codes) {
  const __m512 sv = _mm512_set1_ps(s), step = _mm512_set1_ps(kTwoPowMinus16);
  const __m512 zero = _mm512_setzero_ps(), hsv = _mm512_set1_ps(hs), asv = _mm512_set1_ps(as);
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i max_finite = _mm512_set1_epi32(0x7F7FFFFF);
  const __m128i plus1 = _mm_set1_epi8(1), minus1 = _mm_set1_epi8(-1);
  for (int e = 0; e < kDraws16Avx512; e += 16) {
    const __m512 vv = _mm512_loadu_ps(v + e), hv = _mm512_loadu_ps(hat + e);
    const __m512 av = _mm512_loadu_ps(acc + e);
    const __m512 d = _mm512_sub_ps(vv, hv);
    const __m512i ad = _mm512_and_si512(_mm512_castps_si512(d), abs_mask);
    const __mmask16 nf = _mm512_cmpgt_epi32_mask(ad, max_finite);
    if (nf != 0) _mm512_mask_storeu_ps(v + e, nf, hv);
    const __mmask16 fin = static_cast<__mmask16>(~nf);
    const __m512 dz = _mm512_maskz_mov_ps(fin, d);
    const __m512 a = _mm512_min_ps(sv, _mm512_maskz_mov_ps(fin, _mm512_castsi512_ps(ad)));
    const __m512i hw = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hd + e)));
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hw), step), sv);
    const __mmask16 nz = _mm512_cmp_ps_mask(t, a, _CMP_LT_OQ);
    const __mmask16 pos = _mm512_mask_cmp_ps_mask(nz, dz, zero, _CMP_GT_OQ);
    const __mmask16 neg = _mm512_mask_cmp_ps_mask(nz, dz, zero, _CMP_LT_OQ);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + e),
                     _mm_mask_mov_epi8(_mm_maskz_mov_epi8(pos, plus1), neg, minus1));
    const __m512 cf = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(pos, one), neg, minus_one);
    _mm512_storeu_ps(hat + e, _mm512_add_ps(hv, _mm512_mul_ps(cf, hsv)));
    _mm512_storeu_ps(acc + e, _mm512_add_ps(av, _mm512_mul_ps(cf, asv)));
  }
}
#endif

// A run of one segment (v, hat, acc and codes at its first element, global index g0), batch
// by batch as ternary_run_body: a batch cut by the run's ends goes through the batch function
// on zero-padded copies (a zero lane's d is 0: code 0, and its results are dropped), a piece
// within one counter element by element.
template <int kB, Gen16 kGen, EncodeBatch kBatch>
COMMCOMP_ALWAYS_INLINE void encode_run(float* v, float* hat, float* acc, int64_t len, float s,
                                       float hs, float as, uint64_t seed, uint64_t g0,
                                       int8_t* codes) {
  alignas(64) uint16_t hd[kB];
  int64_t i = 0;
  while (i < len) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    const int skip = static_cast<int>(g & 7u);
    if (skip == 0 && len - i >= kB) {
      kGen(g >> 3, seed, hd);
      kBatch(v + i, hat + i, acc + i, hd, s, hs, as, codes + i);
      i += kB;
      continue;
    }
    const int64_t take = std::min<int64_t>(len - i, kB - skip);
    if (skip + take <= 8) {
      philox16_one(g >> 3, seed, hd);
      for (int64_t e = 0; e < take; ++e) {
        encode_one(v[i + e], hat[i + e], acc[i + e], s, hs, as, hd[skip + e], codes[i + e]);
      }
    } else {
      kGen(g >> 3, seed, hd);
      alignas(64) float pv[kB], ph[kB], pa[kB];
      alignas(64) int8_t pc[kB];
      for (int e = 0; e < kB; ++e) pv[e] = ph[e] = pa[e] = 0.f;
      const size_t bytes = 4 * static_cast<size_t>(take);
      std::memcpy(pv + skip, v + i, bytes);
      std::memcpy(ph + skip, hat + i, bytes);
      std::memcpy(pa + skip, acc + i, bytes);
      kBatch(pv, ph, pa, hd, s, hs, as, pc);
      std::memcpy(v + i, pv + skip, bytes);
      std::memcpy(hat + i, ph + skip, bytes);
      std::memcpy(acc + i, pa + skip, bytes);
      std::memcpy(codes + i, pc + skip, static_cast<size_t>(take));
    }
    i += take;
  }
}

// Elements [i_begin, i_end) (i_begin a multiple of kUnit): the codes of a block of
// kEncodeBlock are staged, then packed with the ISA's pack.
template <int kB, Gen16 kGen, EncodeBatch kBatch, PackFn kPack, PackFn kPack5>
COMMCOMP_ALWAYS_INLINE void encode_body(const EncodeArgs& a, int64_t i_begin, int64_t i_end) {
  alignas(64) int8_t c[kEncodeBlock + kPack5Slack];
  std::memset(c + kEncodeBlock, 0, kPack5Slack);  // read (and discarded) by pack5
  SegmentCursor seg(*a.off, i_begin);
  for (int64_t blk = i_begin; blk < i_end; blk += kEncodeBlock) {
    const int64_t blk_end = std::min(blk + kEncodeBlock, i_end);
    for (int64_t i = blk; i < blk_end;) {
      const int64_t sg = seg.at(i);
      const int64_t stop = std::min(blk_end, seg.end());
      encode_run<kB, kGen, kBatch>(a.v + i, a.hat + i, a.acc + i, stop - i, a.scales[sg],
                                   a.hat_scales[sg], a.acc_scales[sg], a.seed,
                                   a.offset + static_cast<uint64_t>(i), c + (i - blk));
      i = stop;
    }
    const int64_t len = blk_end - blk;
    if (a.base3) {
      const int64_t nbytes = (len + 4) / 5;
      for (int64_t j = len; j < 5 * nbytes; ++j) c[j] = 0;  // padding: code 0
      kPack5(c, nbytes, a.out + blk / 5);
    } else {
      const int64_t nbytes = (len + 3) / 4;
      for (int64_t j = len; j < 4 * nbytes; ++j) c[j] = 0;  // unused fields: 0b00
      kPack(c, nbytes, a.out + blk / 4);
    }
  }
}

// AVX2 and AVX-512 Philox stay out of line in mix_encode's loops: inlined there, their
// registers spill around the batch's (measured 1.26x slower with AVX2, 1.18x with AVX-512;
// run_* call them out of line too). SSE2's is better inlined.
#if defined(COMMCOMP_X86_DISPATCH)
COMMCOMP_TARGET_AVX2 __attribute__((noinline)) void philox16_avx2_call(uint64_t ctr0,
                                                                        uint64_t seed,
                                                                        uint16_t* h) {
  philox16_avx2(ctr0, seed, h);
}
COMMCOMP_TARGET_AVX512 __attribute__((noinline)) void philox16_avx512_call(uint64_t ctr0,
                                                                            uint64_t seed,
                                                                            uint16_t* h) {
  philox16_avx512(ctr0, seed, h);
}
#endif

using EncodeFn = void (*)(const EncodeArgs&, int64_t, int64_t);
#if defined(__SSE2__)
constexpr EncodeBatch kBaseEncodeBatch = &encode_batch_sse2;
#else
constexpr EncodeBatch kBaseEncodeBatch = &encode_batch_portable;
#endif
void encode_base(const EncodeArgs& a, int64_t i_begin, int64_t i_end) {
  encode_body<kBaseDraws, kBaseGen, kBaseEncodeBatch, pack_base, pack5_base>(a, i_begin, i_end);
}
#if defined(COMMCOMP_X86_DISPATCH)
COMMCOMP_TARGET_AVX2 void encode_avx2(const EncodeArgs& a, int64_t i_begin, int64_t i_end) {
  encode_body<kDraws16Avx2, philox16_avx2_call, encode_batch_avx2, pack_avx2, pack5_avx2>(
      a, i_begin, i_end);
}
COMMCOMP_TARGET_AVX512 void encode_avx512(const EncodeArgs& a, int64_t i_begin, int64_t i_end) {
  encode_body<kDraws16Avx512, philox16_avx512_call, encode_batch_avx512, pack_avx512,
              pack5_avx512>(a, i_begin, i_end);
}
#endif

EncodeFn encode_fn(int isa) {
#if defined(COMMCOMP_X86_DISPATCH)
  if (isa == kIsaAvx512) return &encode_avx512;
  if (isa == kIsaAvx2) return &encode_avx2;
#endif
  (void)isa;
  return &encode_base;
}

at::Tensor mix_encode_cpu(const at::Tensor& v, const at::Tensor& hat, const at::Tensor& acc,
                          const at::Tensor& scales, const at::Tensor& hat_scales,
                          const at::Tensor& acc_scales, at::OptionalIntArrayRef segments,
                          int64_t seed, int64_t offset, bool base3) {
  const auto off = check_mix_encode_args(v, hat, acc, scales, hat_scales, acc_scales, segments,
                                         seed, offset);
  const int64_t n = v.numel();
  at::Tensor out = at::empty({base3 ? base3_bytes(n) : packed_bytes(n)},
                             v.options().dtype(at::kByte));
  if (n == 0) return out;
  const EncodeArgs args{v.mutable_data_ptr<float>(),
                        hat.mutable_data_ptr<float>(),
                        acc.mutable_data_ptr<float>(),
                        scales.const_data_ptr<float>(),
                        hat_scales.const_data_ptr<float>(),
                        acc_scales.const_data_ptr<float>(),
                        &off,
                        static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(offset),
                        base3,
                        out.mutable_data_ptr<uint8_t>()};
  const EncodeFn encode = encode_fn(current_isa());
  at::parallel_for(0, (n + kUnit - 1) / kUnit, kGrainUnits, [&](int64_t u0, int64_t u1) {
    encode(args, u0 * kUnit, std::min(u1 * kUnit, n));
  });
  return out;
}

}  // namespace

// For commcomp._C (csrc/ops.cpp): the instruction set of the ternary CPU kernels.
const char* ternary_isa() { return kIsaNames[current_isa()]; }

// Switches to the named instruction set; false (nothing changes) if unknown or unsupported.
bool set_ternary_isa(const char* name) {
  const int isa = isa_by_name(name);
  if (isa < 0 || !isa_supported(isa)) return false;
  g_isa.store(isa, std::memory_order_relaxed);
  return true;
}

// The instruction sets this CPU runs, baseline first, comma-separated.
std::string ternary_isas() { return supported_isa_list(); }

TORCH_LIBRARY_IMPL(commcomp, CPU, m) {
  m.impl("ternarize_pack", &ternarize_pack_cpu);
  m.impl("ternarize_int8", &ternarize_int8_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("unpack_accumulate", &unpack_accumulate_cpu);
  m.impl("ternarize_base3", &ternarize_base3_cpu);
  m.impl("unpack_base3", &unpack_base3_cpu);
  m.impl("mix_encode", &mix_encode_cpu);
}

}  // namespace commcomp
