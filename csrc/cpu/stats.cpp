// CPU kernel of segment_stats: per-segment max |x| and population std in one read of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../stats.h"

namespace commcomp {
namespace {

constexpr int kBlock = 64;  // float partial sums over short blocks, then float64

template <typename scalar_t>
Moments piece_moments(const scalar_t* x, int64_t len) {
  // Pass 1: sum and max |x|. NaN is tracked apart so that the max loop stays vectorizable.
  double sum = 0.0;
  float amax = 0.f;
  bool nan = false;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min<int64_t>(kBlock, len - b);
    float part = 0.f, bmax = 0.f;
    for (int64_t i = 0; i < e; ++i) {
      const float v = static_cast<float>(x[b + i]);
      const float a = std::fabs(v);
      part += v;
      bmax = a > bmax ? a : bmax;
      nan |= (v != v);
    }
    sum += part;
    amax = bmax > amax ? bmax : amax;
  }
  const double mean = len > 0 ? sum / static_cast<double>(len) : 0.0;
  // Pass 2 (the piece is still in cache): centred squares, for an accurate variance.
  const float mf = static_cast<float>(mean);
  double m2 = 0.0, shift = 0.0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min<int64_t>(kBlock, len - b);
    float sq = 0.f, lin = 0.f;
    for (int64_t i = 0; i < e; ++i) {
      const float d = static_cast<float>(x[b + i]) - mf;
      sq += d * d;
      lin += d;
    }
    m2 += sq;
    shift += lin;
  }
  // Correct for mean - mf (the float rounding of the mean): sum (x - mean)^2 =
  // sum (x - mf)^2 - (sum (x - mf))^2 / len.
  if (len > 0) m2 -= shift * shift / static_cast<double>(len);
  const float nanf = std::numeric_limits<float>::quiet_NaN();
  // Rounding can leave m2 slightly negative; NaN (from NaN or Inf data) must stay NaN.
  return Moments{static_cast<double>(len), mean, m2 < 0.0 ? 0.0 : m2, nan ? nanf : amax};
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
