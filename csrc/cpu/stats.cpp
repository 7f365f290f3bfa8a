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

// One pass over one piece in float64, centred on the piece's first value K:
// mean = K + sum(x - K) / n, m2 = sum (x - K)^2 - (sum (x - K))^2 / n. K is a sample of the
// piece, so the cancellation costs a few bits of float64 at most, and squares of float data
// cannot overflow float64. NaN is tracked apart so the loop stays branch-free; four
// independent accumulators keep the adds pipelined.
template <typename scalar_t>
Moments piece_moments(const scalar_t* x, int64_t len) {
  if (len == 0) return Moments{0.0, 0.0, 0.0, 0.f};
  const double k0 = static_cast<float>(x[0]);
  double lin[4] = {0.0, 0.0, 0.0, 0.0}, sq[4] = {0.0, 0.0, 0.0, 0.0};
  float amax[4] = {0.f, 0.f, 0.f, 0.f};
  bool nan = false;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const float v = static_cast<float>(x[i + k]);
      const float a = std::fabs(v);
      const double d = static_cast<double>(v) - k0;
      lin[k] += d;
      sq[k] += d * d;
      amax[k] = a > amax[k] ? a : amax[k];
      nan |= (v != v);
    }
  }
  for (; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    const double d = static_cast<double>(v) - k0;
    lin[0] += d;
    sq[0] += d * d;
    amax[0] = std::fabs(v) > amax[0] ? std::fabs(v) : amax[0];
    nan |= (v != v);
  }
  const double n = static_cast<double>(len);
  const double l = (lin[0] + lin[1]) + (lin[2] + lin[3]);
  const double m2 = ((sq[0] + sq[1]) + (sq[2] + sq[3])) - l * l / n;
  const float amx = std::max(std::max(amax[0], amax[1]), std::max(amax[2], amax[3]));
  const float nanf = std::numeric_limits<float>::quiet_NaN();
  // Rounding can leave m2 slightly negative; NaN (from NaN or Inf data) must stay NaN.
  return Moments{n, k0 + l / n, m2 < 0.0 ? 0.0 : m2, nan ? nanf : amx};
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
