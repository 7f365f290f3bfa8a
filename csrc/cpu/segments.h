// Walks the segments of a flat buffer in index order (CPU kernels only).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace commcomp {

class SegmentCursor {
 public:
  // off = [0, ..., n] as built by segment_offsets(); start = first index visited.
  SegmentCursor(const std::vector<int64_t>& off, int64_t start) : off_(off) {
    const int64_t last = static_cast<int64_t>(off.size()) - 2;
    s_ = std::upper_bound(off.begin(), off.end(), start) - off.begin() - 1;
    s_ = std::max<int64_t>(0, std::min(s_, last));
  }
  // Segment of index i (i never decreases between calls); skips empty segments.
  int64_t at(int64_t i) {
    while (i >= off_[s_ + 1] && s_ + 2 < static_cast<int64_t>(off_.size())) ++s_;
    return s_;
  }
  int64_t end() const { return off_[s_ + 1]; }

 private:
  const std::vector<int64_t>& off_;
  int64_t s_;
};

}  // namespace commcomp
