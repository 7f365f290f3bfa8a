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

// Two passes over one piece (the second from cache), accumulating in float64 so that large
// finite values cannot overflow and a large mean cannot swamp the variance. Four independent
// accumulators keep the adds pipelined; NaN is tracked apart so the max stays branch-free.
template <typename scalar_t>
Moments piece_moments(const scalar_t* x, int64_t len) {
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  float amax = 0.f;
  bool nan = false;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const float v = static_cast<float>(x[i + k]);
      const float a = std::fabs(v);
      sum[k] += v;
      amax = a > amax ? a : amax;
      nan |= (v != v);
    }
  }
  for (; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    sum[0] += v;
    amax = std::fabs(v) > amax ? std::fabs(v) : amax;
    nan |= (v != v);
  }
  const double mean = len > 0 ? ((sum[0] + sum[1]) + (sum[2] + sum[3])) / len : 0.0;
  double m2[4] = {0.0, 0.0, 0.0, 0.0};
  for (i = 0; i + 4 <= len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const double d = static_cast<double>(static_cast<float>(x[i + k])) - mean;
      m2[k] += d * d;
    }
  }
  for (; i < len; ++i) {
    const double d = static_cast<double>(static_cast<float>(x[i])) - mean;
    m2[0] += d * d;
  }
  const float nanf = std::numeric_limits<float>::quiet_NaN();
  return Moments{static_cast<double>(len), mean, (m2[0] + m2[1]) + (m2[2] + m2[3]),
                 nan ? nanf : amax};
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
