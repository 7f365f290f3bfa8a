// CPU kernels of the ternary codec: ternarize (to 2-bit packed bytes or int8 codes), unpack,
// and the fused multi-rank unpack_accumulate. The bit-level rules are in csrc/ternary.h.
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

#include "../checks.h"
#include "../ternary.h"
#include "philox_batch.h"
#include "segments.h"

namespace commcomp {
namespace {

constexpr int64_t kGrainBytes = 4096;  // 16 Ki elements per task: fixed, so results never
                                       // depend on the number of threads.
constexpr int64_t kTile = 1024;        // elements per unpack_accumulate tile (fits in L1)

// The four decoded fields of every byte value.
struct DecodeTable {
  float v[256][4];
  DecodeTable() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) v[b][k] = decode2(static_cast<uint32_t>(b), k);
  }
};
const DecodeTable kDecodeTable;

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
// a misaligned head takes the rest of its batch, and a piece that fits in one counter (a
// short segment or tail) draws just that counter; both go element by element.
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
    } else {
      kGen(g >> 3, seed, h);
    }
    for (int64_t e = 0; e < take; ++e) {
      const float v = static_cast<float>(x[i + e]);
      codes[i + e] = static_cast<int8_t>(ternary_code(v, s, h[skip + e]));
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

#if defined(COMMCOMP_X86_DISPATCH)
template <typename scalar_t>
COMMCOMP_TARGET_AVX2 void run_avx2(const scalar_t* x, int64_t len, float s, uint64_t seed,
                                   uint64_t g0, int8_t* codes) {
  ternary_run_body<kDraws16Avx2, philox16_avx2, codes_avx2>(x, len, s, seed, g0, codes);
}
COMMCOMP_TARGET_AVX2 void pack_avx2(const int8_t* c, int64_t nbytes, uint8_t* out) {
  pack_body(c, nbytes, out);
}
template <typename scalar_t>
COMMCOMP_TARGET_AVX512 void run_avx512(const scalar_t* x, int64_t len, float s,
                                       uint64_t seed, uint64_t g0, int8_t* codes) {
  ternary_run_body<kDraws16Avx512, philox16_avx512, codes_avx512>(x, len, s, seed, g0, codes);
}
COMMCOMP_TARGET_AVX512 void pack_avx512(const int8_t* c, int64_t nbytes, uint8_t* out) {
  pack_body(c, nbytes, out);
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
}

}  // namespace commcomp
