// CPU kernel of segment_stats: per-segment max |x| and population std in one read of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../checks.h"
#include "../stats.h"

namespace commcomp {
namespace {

// The running sums of piece_moments: lane k (0..3) takes the elements i = k (mod 4), in order.
struct MomentLanes {
  double lin[4] = {0.0, 0.0, 0.0, 0.0};
  double sq[4] = {0.0, 0.0, 0.0, 0.0};
  float amax[4] = {0.f, 0.f, 0.f, 0.f};
  bool nan = false;
};

// Adds x[0, len) (len a multiple of 4, x[0] in lane 0) to the lanes, centred on k0:
// lin[k] += d, sq[k] += d * d with d = double(v) - k0, amax[k] = |v| > amax[k] ? |v| : amax[k].
// The SSE2 form does exactly these operations, lane by lane in the same order (MAXPS keeps its
// second operand when the first is NaN, like the comparison), so the results are the scalar
// form's bit for bit; it only trades GCC's scalar code (no vectorizer without reassociation)
// for two doubles per instruction.
inline void feed_lanes(const float* x, int64_t len, double k0, MomentLanes& m) {
#if defined(__SSE2__)
  __m128d lin01 = _mm_loadu_pd(m.lin), lin23 = _mm_loadu_pd(m.lin + 2);
  __m128d sq01 = _mm_loadu_pd(m.sq), sq23 = _mm_loadu_pd(m.sq + 2);
  __m128 amax = _mm_loadu_ps(m.amax);
  __m128 nan = _mm_setzero_ps();  // all-ones in a lane once it has seen a NaN
  const __m128d kk = _mm_set1_pd(k0);
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < len; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    const __m128d d01 = _mm_sub_pd(_mm_cvtps_pd(v), kk);
    const __m128d d23 = _mm_sub_pd(_mm_cvtps_pd(_mm_movehl_ps(v, v)), kk);
    lin01 = _mm_add_pd(lin01, d01);
    lin23 = _mm_add_pd(lin23, d23);
    sq01 = _mm_add_pd(sq01, _mm_mul_pd(d01, d01));
    sq23 = _mm_add_pd(sq23, _mm_mul_pd(d23, d23));
    amax = _mm_max_ps(_mm_and_ps(v, abs_mask), amax);  // |v| > amax ? |v| : amax
    nan = _mm_or_ps(nan, _mm_cmpunord_ps(v, v));
  }
  _mm_storeu_pd(m.lin, lin01);
  _mm_storeu_pd(m.lin + 2, lin23);
  _mm_storeu_pd(m.sq, sq01);
  _mm_storeu_pd(m.sq + 2, sq23);
  _mm_storeu_ps(m.amax, amax);
  m.nan |= _mm_movemask_ps(nan) != 0;
#else
  for (int64_t i = 0; i < len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const float v = x[i + k];
      const float a = std::fabs(v);
      const double d = static_cast<double>(v) - k0;
      m.lin[k] += d;
      m.sq[k] += d * d;
      m.amax[k] = a > m.amax[k] ? a : m.amax[k];
      m.nan |= (v != v);
    }
  }
#endif
}

// One pass over one piece in float64, centred on the piece's first value K:
// mean = K + sum(x - K) / n, m2 = sum (x - K)^2 - (sum (x - K))^2 / n. K is a sample of the
// piece, so the cancellation costs a few bits of float64 at most, and squares of float data
// cannot overflow float64. NaN is tracked apart so the loop stays branch-free; four
// independent accumulators keep the adds pipelined. Other dtypes are converted to float in
// small blocks (a multiple of 4, so every element keeps its lane) and summed the same way.
template <typename scalar_t>
Moments piece_moments(const scalar_t* x, int64_t len) {
  if (len == 0) return Moments{0.0, 0.0, 0.0, 0.f};
  const double k0 = static_cast<float>(x[0]);
  MomentLanes m;
  const int64_t body = len & ~int64_t{3};
  if constexpr (std::is_same_v<scalar_t, float>) {
    feed_lanes(x, body, k0, m);
  } else {
    constexpr int64_t kBlock = 512;
    float buf[kBlock];
    for (int64_t b = 0; b < body; b += kBlock) {
      const int64_t cnt = std::min(kBlock, body - b);
      for (int64_t j = 0; j < cnt; ++j) buf[j] = static_cast<float>(x[b + j]);
      feed_lanes(buf, cnt, k0, m);
    }
  }
  for (int64_t i = body; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    const double d = static_cast<double>(v) - k0;
    m.lin[0] += d;
    m.sq[0] += d * d;
    m.amax[0] = std::fabs(v) > m.amax[0] ? std::fabs(v) : m.amax[0];
    m.nan |= (v != v);
  }
  const double n = static_cast<double>(len);
  const double l = (m.lin[0] + m.lin[1]) + (m.lin[2] + m.lin[3]);
  const double m2 = ((m.sq[0] + m.sq[1]) + (m.sq[2] + m.sq[3])) - l * l / n;
  const float amx = std::max(std::max(m.amax[0], m.amax[1]), std::max(m.amax[2], m.amax[3]));
  const float nanf = std::numeric_limits<float>::quiet_NaN();
  // Rounding can leave m2 slightly negative; NaN (from NaN or Inf data) must stay NaN.
  return Moments{n, k0 + l / n, m2 < 0.0 ? 0.0 : m2, m.nan ? nanf : amx};
}

std::tuple<at::Tensor, at::Tensor> segment_stats_cpu(const at::Tensor& x,
                                                     at::OptionalIntArrayRef segments) {
  check_float_input(x, "x");
  const int64_t n = x.numel();
  const auto off = segment_offsets(segments, n);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  const PieceTable table = stats_pieces(off);
  std::vector<Moments> pieces(table.begin.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segstats", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        pieces[p] = piece_moments(px + table.begin[p], table.len[p]);
      }
    });
  });
  at::Tensor absmax = at::empty({nseg}, x.options().dtype(at::kFloat));
  at::Tensor stdev = at::empty({nseg}, x.options().dtype(at::kFloat));
  float* pa = absmax.mutable_data_ptr<float>();
  float* ps = stdev.mutable_data_ptr<float>();
  for (int64_t s = 0; s < nseg; ++s) {
    Moments m{0.0, 0.0, 0.0, 0.f};
    for (int64_t p = table.first[s]; p < table.first[s + 1]; ++p) m = merge_moments(m, pieces[p]);
    pa[s] = m.absmax;
    ps[s] = moments_std(m);
  }
  return {absmax, stdev};
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CPU, m) { m.impl("segment_stats", &segment_stats_cpu); }

}  // namespace commcomp
