// CPU kernels of compressed mixing's element-wise passes over flat float32 state (the rules are
// those of commcomp/ops/reference.py): mix_stats (per-segment statistics of d = v - hat),
// mix_decode (the neighbours' codes into acc, then v += gamma (acc - hat)) and track_prep (the
// gradient tracker's y += g - g_prev behind a finite check). mix_encode, which draws ternary
// codes, lives with the codec in csrc/cpu/ternary.cpp.
//
// mix_decode must round gamma * (acc - hat) before adding it to v, as the reference does; GCC
// would fuse the two into an FMA wherever the target has one (-ffp-contract=fast is its default,
// also in ISO C++ mode), so contraction is switched off for this whole file, headers included
// (one set of options for every function here, so inlining is unaffected). The product and the
// sum are also separate statements, which is enough for clang (-ffp-contract=on fuses only
// within one expression).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../checks.h"
#include "../stats.h"
#include "decode_tables.h"
#include "segments.h"

namespace commcomp {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task of the element-wise loops

inline uint32_t not_finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint32_t>((bits & 0x7F800000u) == 0x7F800000u);
}

// ------------------------------------------------------------------ mix_stats

// Statistics of one piece of d = v - hat over its finite entries.
struct MixPiece {
  float amax = 0.f;   // max |d|
  double l1 = 0.0;    // sum |d|
  double l2 = 0.0;    // sum d^2 (each square exact in float64)
  int64_t bad = 0;    // entries whose d is not finite
};

// The piece's statistics in eight lanes (element i in lane i % 8, each summing in order, then
// the lanes in order). SSE2 restates the scalar form lane-wise: GCC leaves that form scalar,
// with a branch for the sign that mispredicts on half of random data.
MixPiece mix_piece(const float* __restrict v, const float* __restrict h, int64_t len) {
  float mx[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  double l1[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  double l2[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int32_t bad[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // a piece has at most kStatsPiece entries
  int64_t scalar_from = 0;
#if defined(__SSE2__)
  {
    const int64_t body = len - len % 8;
    const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF), max_finite = _mm_set1_epi32(0x7F7FFFFF);
    __m128 mx0 = _mm_setzero_ps(), mx1 = _mm_setzero_ps();
    __m128i bad0 = _mm_setzero_si128(), bad1 = _mm_setzero_si128();
    __m128d s1[4], s2[4];
    for (int k = 0; k < 4; ++k) s1[k] = s2[k] = _mm_setzero_pd();
    for (int64_t i = 0; i < body; i += 8) {
      const __m128 d0 = _mm_sub_ps(_mm_loadu_ps(v + i), _mm_loadu_ps(h + i));
      const __m128 d1 = _mm_sub_ps(_mm_loadu_ps(v + i + 4), _mm_loadu_ps(h + i + 4));
      // |d| by clearing the sign bit; not finite: |d| above the largest finite float.
      const __m128i ab0 = _mm_and_si128(_mm_castps_si128(d0), abs_mask);
      const __m128i ab1 = _mm_and_si128(_mm_castps_si128(d1), abs_mask);
      const __m128i nf0 = _mm_cmpgt_epi32(ab0, max_finite);
      const __m128i nf1 = _mm_cmpgt_epi32(ab1, max_finite);
      const __m128 a0 = _mm_castsi128_ps(_mm_andnot_si128(nf0, ab0));  // 0 where not finite
      const __m128 a1 = _mm_castsi128_ps(_mm_andnot_si128(nf1, ab1));
      mx0 = _mm_max_ps(a0, mx0);
      mx1 = _mm_max_ps(a1, mx1);
      bad0 = _mm_sub_epi32(bad0, nf0);
      bad1 = _mm_sub_epi32(bad1, nf1);
      const __m128d p0 = _mm_cvtps_pd(a0), p1 = _mm_cvtps_pd(_mm_movehl_ps(a0, a0));
      const __m128d p2 = _mm_cvtps_pd(a1), p3 = _mm_cvtps_pd(_mm_movehl_ps(a1, a1));
      s1[0] = _mm_add_pd(s1[0], p0);
      s1[1] = _mm_add_pd(s1[1], p1);
      s1[2] = _mm_add_pd(s1[2], p2);
      s1[3] = _mm_add_pd(s1[3], p3);
      s2[0] = _mm_add_pd(s2[0], _mm_mul_pd(p0, p0));  // squares of floats: exact in float64
      s2[1] = _mm_add_pd(s2[1], _mm_mul_pd(p1, p1));
      s2[2] = _mm_add_pd(s2[2], _mm_mul_pd(p2, p2));
      s2[3] = _mm_add_pd(s2[3], _mm_mul_pd(p3, p3));
    }
    _mm_storeu_ps(mx, mx0);
    _mm_storeu_ps(mx + 4, mx1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bad), bad0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bad + 4), bad1);
    for (int k = 0; k < 4; ++k) {
      _mm_storeu_pd(l1 + 2 * k, s1[k]);
      _mm_storeu_pd(l2 + 2 * k, s2[k]);
    }
    scalar_from = body;
  }
#endif
  for (int64_t i = scalar_from; i < len; ++i) {
    const float d = v[i] - h[i];
    uint32_t bits;
    std::memcpy(&bits, &d, 4);
    const uint32_t ab = bits & 0x7FFFFFFFu;
    const uint32_t nf = static_cast<uint32_t>(ab > 0x7F7FFFFFu);
    const uint32_t kept = ab & (nf - 1u);  // |d|, or 0 where not finite
    float a;
    std::memcpy(&a, &kept, 4);
    const int k = static_cast<int>(i & 7);
    mx[k] = a > mx[k] ? a : mx[k];
    const double ad = static_cast<double>(a);
    l1[k] += ad;
    l2[k] += ad * ad;
    bad[k] += static_cast<int32_t>(nf);
  }
  MixPiece p;
  for (int k = 0; k < 8; ++k) {
    p.amax = mx[k] > p.amax ? mx[k] : p.amax;
    p.l1 += l1[k];
    p.l2 += l2[k];
    p.bad += bad[k];
  }
  return p;
}

at::Tensor mix_stats_cpu(const at::Tensor& v, const at::Tensor& hat,
                         at::OptionalIntArrayRef segments) {
  const auto off = check_mix_stats_args(v, hat, segments);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  const PieceTable table = stats_pieces(off);  // fixed pieces: results independent of threads
  std::vector<MixPiece> pieces(table.begin.size());
  const float* pv = v.const_data_ptr<float>();
  const float* ph = hat.const_data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      pieces[p] = mix_piece(pv + table.begin[p], ph + table.begin[p], table.len[p]);
    }
  });
  at::Tensor out = at::empty({nseg, 4}, v.options().dtype(at::kFloat));
  float* po = out.mutable_data_ptr<float>();
  for (int64_t s = 0; s < nseg; ++s) {
    MixPiece m;
    for (int64_t p = table.first[s]; p < table.first[s + 1]; ++p) {
      m.amax = pieces[p].amax > m.amax ? pieces[p].amax : m.amax;
      m.l1 += pieces[p].l1;
      m.l2 += pieces[p].l2;
      m.bad += pieces[p].bad;
    }
    po[4 * s + 0] = m.amax;
    po[4 * s + 1] = static_cast<float>(m.l1);
    po[4 * s + 2] = static_cast<float>(m.l2);
    po[4 * s + 3] = static_cast<float>(m.bad);
  }
  return out;
}

// ------------------------------------------------------------------ mix_decode
//
// Per element: t = ((0 + c_0 s_0) + c_1 s_1) + ... over the payloads in order (each c s exact),
// acc += t, v = v + round(gamma * round(acc - hat)). Groups of 16 (2-bit: 4 bytes) or 20
// (base-3: 4 bytes) elements keep t in registers across the payloads and then update v and acc
// at once, so the code lookups (compute) and the pass over v, hat and acc (memory) interleave
// finely; staging a tile's codes and t in L1 first measured twice the time of one pass.

constexpr int64_t kDecodeUnit = 80;           // tasks start on whole groups of either packing
constexpr int64_t kDecodeGrainUnits = 205;    // 16400 elements per task

// The codes of element i of a payload (2-bit or base-3).
inline float code_at(const uint8_t* p, int64_t i, bool base3) {
  return base3 ? kBase3Table.v[p[i / 5]][i % 5] : kDecodeTable.v[p[i >> 2]][i & 3];
}

// Element by element: the heads and tails of segment runs, and runs with a non-finite scale.
inline void decode_one(float* v, const float* hat, float* acc, const uint8_t* const* pay,
                       const float* sw, int64_t rows, int64_t i, bool base3, float g) {
  float t = 0.f;
  for (int64_t w = 0; w < rows; ++w) {
    const float q = code_at(pay[w], i, base3) * sw[w];
    t = t + q;
  }
  const float a = acc[i] + t;
  acc[i] = a;
  const float m = g * (a - hat[i]);  // rounded, then added: no fused multiply-add
  v[i] = v[i] + m;
}

#if defined(__SSE2__)
inline void decode_finish(__m128 t, float* v, const float* hat, float* acc, __m128 g) {
  const __m128 a = _mm_add_ps(_mm_loadu_ps(acc), t);
  _mm_storeu_ps(acc, a);
  const __m128 m = _mm_mul_ps(g, _mm_sub_ps(a, _mm_loadu_ps(hat)));
  _mm_storeu_ps(v, _mm_add_ps(_mm_loadu_ps(v), m));
}

// 16 elements from i (a multiple of 4) of 2-bit payloads: one decoded byte per vector.
inline void decode_group2(float* v, const float* hat, float* acc, const uint8_t* const* pay,
                          const float* sw, int64_t rows, int64_t i, __m128 g) {
  __m128 t0 = _mm_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
  const int64_t b = i >> 2;
  for (int64_t w = 0; w < rows; ++w) {
    const uint8_t* p = pay[w] + b;
    const __m128 s = _mm_set1_ps(sw[w]);
    t0 = _mm_add_ps(t0, _mm_mul_ps(_mm_loadu_ps(kDecodeTable.v[p[0]]), s));
    t1 = _mm_add_ps(t1, _mm_mul_ps(_mm_loadu_ps(kDecodeTable.v[p[1]]), s));
    t2 = _mm_add_ps(t2, _mm_mul_ps(_mm_loadu_ps(kDecodeTable.v[p[2]]), s));
    t3 = _mm_add_ps(t3, _mm_mul_ps(_mm_loadu_ps(kDecodeTable.v[p[3]]), s));
  }
  decode_finish(t0, v + i, hat + i, acc + i, g);
  decode_finish(t1, v + i + 4, hat + i + 4, acc + i + 4, g);
  decode_finish(t2, v + i + 8, hat + i + 8, acc + i + 8, g);
  decode_finish(t3, v + i + 12, hat + i + 12, acc + i + 12, g);
}

// 20 elements from i (a multiple of 5) of base-3 payloads: byte k's five codes go to lanes
// 5k .. 5k + 4, i.e. to vectors k and k + 1 (kBase3ShiftTable), the other lanes of those two
// getting 0 * s. With finite scales that adds +-0 to a t that is never -0 (it starts at +0),
// which changes no bit; a non-finite scale would add NaN, so such runs go element by element.
inline void decode_group3(float* v, const float* hat, float* acc, const uint8_t* const* pay,
                          const float* sw, int64_t rows, int64_t i, __m128 g) {
  __m128 t0 = _mm_setzero_ps(), t1 = t0, t2 = t0, t3 = t0, t4 = t0;
  const int64_t b = i / 5;
  for (int64_t w = 0; w < rows; ++w) {
    const uint8_t* p = pay[w] + b;
    const __m128 s = _mm_set1_ps(sw[w]);
    const float* r0 = kBase3ShiftTable.v[p[0]];
    const float* r1 = kBase3ShiftTable.v[p[1]];
    const float* r2 = kBase3ShiftTable.v[p[2]];
    const float* r3 = kBase3ShiftTable.v[p[3]];
    // Lanes of one element get their own code's product once; in the two vectors a byte
    // touches, its row is added to t0..t4 in the order of the bytes (k then k + 1).
    t0 = _mm_add_ps(t0, _mm_mul_ps(_mm_loadu_ps(r0 + 3), s));
    t1 = _mm_add_ps(t1, _mm_mul_ps(_mm_loadu_ps(r0 + 7), s));
    t1 = _mm_add_ps(t1, _mm_mul_ps(_mm_loadu_ps(r1 + 2), s));
    t2 = _mm_add_ps(t2, _mm_mul_ps(_mm_loadu_ps(r1 + 6), s));
    t2 = _mm_add_ps(t2, _mm_mul_ps(_mm_loadu_ps(r2 + 1), s));
    t3 = _mm_add_ps(t3, _mm_mul_ps(_mm_loadu_ps(r2 + 5), s));
    t3 = _mm_add_ps(t3, _mm_mul_ps(_mm_loadu_ps(r3 + 0), s));
    t4 = _mm_add_ps(t4, _mm_mul_ps(_mm_loadu_ps(r3 + 4), s));
  }
  decode_finish(t0, v + i, hat + i, acc + i, g);
  decode_finish(t1, v + i + 4, hat + i + 4, acc + i + 4, g);
  decode_finish(t2, v + i + 8, hat + i + 8, acc + i + 8, g);
  decode_finish(t3, v + i + 12, hat + i + 12, acc + i + 12, g);
  decode_finish(t4, v + i + 16, hat + i + 16, acc + i + 16, g);
}
#endif

void mix_decode_cpu(const at::Tensor& v, const at::Tensor& hat, const at::Tensor& acc,
                    at::TensorList packed, const at::Tensor& scales,
                    at::OptionalIntArrayRef segments, double gamma, bool base3) {
  const auto off = check_mix_decode_args(v, hat, acc, packed, scales, segments, base3);
  const int64_t n = v.numel();
  if (n == 0) return;
  const int64_t rows = static_cast<int64_t>(packed.size());
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  std::vector<const uint8_t*> payloads(rows);
  for (int64_t w = 0; w < rows; ++w) payloads[w] = packed[w].const_data_ptr<uint8_t>();
  const uint8_t* const* pay = payloads.data();
  const float* sc = scales.const_data_ptr<float>();
  float* pv = v.mutable_data_ptr<float>();
  const float* ph = hat.const_data_ptr<float>();
  float* pa = acc.mutable_data_ptr<float>();
  const float g = static_cast<float>(gamma);  // the reference's float32 gamma
  const int64_t group = base3 ? 20 : 16;
  at::parallel_for(0, (n + kDecodeUnit - 1) / kDecodeUnit, kDecodeGrainUnits,
                   [&](int64_t u0, int64_t u1) {
    const int64_t i_begin = u0 * kDecodeUnit, i_end = std::min(u1 * kDecodeUnit, n);
    std::vector<float> sw(static_cast<size_t>(rows));  // each payload's scale in this segment
#if defined(__SSE2__)
    const __m128 gv = _mm_set1_ps(g);
#endif
    SegmentCursor seg(off, i_begin);
    for (int64_t i = i_begin; i < i_end;) {
      const int64_t sg = seg.at(i);
      const int64_t stop = std::min(i_end, seg.end());
      bool finite = true;
      for (int64_t w = 0; w < rows; ++w) {
        sw[w] = sc[w * nseg + sg];
        finite = finite && not_finite(sw[w]) == 0;
      }
#if defined(__SSE2__)
      if (finite) {
        for (; i < stop && i % group != 0; ++i) {
          decode_one(pv, ph, pa, pay, sw.data(), rows, i, base3, g);
        }
        if (base3) {
          for (; i + 20 <= stop; i += 20) decode_group3(pv, ph, pa, pay, sw.data(), rows, i, gv);
        } else {
          for (; i + 16 <= stop; i += 16) decode_group2(pv, ph, pa, pay, sw.data(), rows, i, gv);
        }
      }
#else
      (void)finite;
      (void)group;
#endif
      for (; i < stop; ++i) decode_one(pv, ph, pa, pay, sw.data(), rows, i, base3, g);
    }
  });
}

// ------------------------------------------------------------------ track_prep

at::Tensor track_prep_cpu(const at::Tensor& y, const at::Tensor& g, const at::Tensor& g_prev) {
  check_track_prep_args(y, g, g_prev);
  const int64_t n = y.numel();
  const float* pg = g.const_data_ptr<float>();
  const bool ok = at::parallel_reduce(
      0, n, kGrain, true,
      [&](int64_t b, int64_t e, bool ident) {
        uint32_t bad = 0;
        for (int64_t i = b; i < e; ++i) bad |= not_finite(pg[i]);
        return ident && bad == 0;
      },
      std::logical_and<bool>());
  if (ok && n > 0) {
    float* py = y.mutable_data_ptr<float>();
    float* pp = g_prev.mutable_data_ptr<float>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      float* __restrict yy = py + b;
      float* __restrict gp = pp + b;
      const float* __restrict gg = pg + b;
      for (int64_t j = 0; j < e - b; ++j) {
        const float s = yy[j] + gg[j];
        yy[j] = s - gp[j];
        gp[j] = gg[j];
      }
    });
  }
  return at::scalar_tensor(ok, y.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CPU, m) {
  m.impl("mix_stats", &mix_stats_cpu);
  m.impl("mix_decode", &mix_decode_cpu);
  m.impl("track_prep", &track_prep_cpu);
}

}  // namespace commcomp
