// Per-segment statistics shared by the CPU and CUDA kernels: max |x| (NaN-propagating, so a
// non-finite value in a segment shows up in its result) and the population standard
// deviation, merged piece by piece with Chan et al.'s parallel formula in float64. Pieces have
// a fixed length, so results do not depend on the number of threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "ternary.h"

namespace commcomp {

constexpr int64_t kStatsPiece = 16384;

struct Moments {
  double count;
  double mean;
  double m2;
  float absmax;
};

COMMCOMP_HD float nan_max(float a, float b) {
  // max that keeps NaN: once a NaN is seen it wins, so one bad value poisons the segment.
  return (a != a || b != b) ? (a != a ? a : b) : (a > b ? a : b);
}

COMMCOMP_HD Moments merge_moments(const Moments& a, const Moments& b) {
  if (a.count == 0.0) return Moments{b.count, b.mean, b.m2, nan_max(a.absmax, b.absmax)};
  if (b.count == 0.0) return Moments{a.count, a.mean, a.m2, nan_max(a.absmax, b.absmax)};
  const double n = a.count + b.count;
  const double d = b.mean - a.mean;
  return Moments{n, a.mean + d * (b.count / n), a.m2 + b.m2 + d * d * (a.count * b.count / n),
                 nan_max(a.absmax, b.absmax)};
}

COMMCOMP_HD float moments_std(const Moments& m) {
  if (m.count == 0.0) return 0.f;
  const double var = m.m2 / m.count;
  return static_cast<float>(var > 0.0 ? sqrt(var) : (var != var ? var : 0.0));
}

// Host side: each segment of off = [0, ..., n] cut into pieces of at most kStatsPiece
// elements. first[s] .. first[s + 1] index the pieces of segment s (none when it is empty).
struct PieceTable {
  std::vector<int64_t> begin, len, first{0};
};

inline PieceTable stats_pieces(const std::vector<int64_t>& off) {
  PieceTable t;
  for (size_t s = 0; s + 1 < off.size(); ++s) {
    for (int64_t b = off[s]; b < off[s + 1]; b += kStatsPiece) {
      t.begin.push_back(b);
      t.len.push_back(std::min(kStatsPiece, off[s + 1] - b));
    }
    t.first.push_back(static_cast<int64_t>(t.begin.size()));
  }
  return t;
}

}  // namespace commcomp
