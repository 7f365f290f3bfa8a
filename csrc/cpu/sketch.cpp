// CPU kernels of the sketch operators: CountSketch and block SRHT, forward and transpose.
// The rules are in csrc/sketch.h. Every result is independent of the number of threads:
// countsketch_transpose, srht and srht_transpose are bit-exact with the reference
// (commcomp/ops/reference.py); countsketch sums each bucket in a fixed order that depends only
// on (numel, sketch_size), which differs from the reference's order only by float rounding.
//
// Philox (one 10-round call per element) dominates; it runs kLanes counters wide in SSE2
// (csrc/cpu/philox_batch.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../sketch.h"
#include "philox_batch.h"

namespace commcomp {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task
constexpr int64_t kTile = 4096;    // Walsh-Hadamard tile done in L1 (16 KiB of float)
constexpr int64_t kMaxParts = 16;  // countsketch: input parts summed separately, then merged

// f(j, w) for every j in [j0, j1), with w the four words W(j, tag) (csrc/sketch.h).
template <typename F>
inline void for_each_words(int64_t j0, int64_t j1, uint64_t seed, uint32_t tag, F&& f) {
  int64_t j = j0;
  PhiloxBatch rb;
  for (; j + kLanes <= j1; j += kLanes) {
    philox_batch(static_cast<uint64_t>(j), seed, rb, tag);
    for (int l = 0; l < kLanes; ++l) f(j + l, rb.w + 4 * l);
  }
  for (; j < j1; ++j) {
    uint32_t w[4];
    philox4x32_10(static_cast<uint64_t>(j), seed, w, tag);
    f(j, w);
  }
}

// ------------------------------------------------------------------ CountSketch

// Start of part p of K near-equal contiguous parts of [0, n).
inline int64_t part_start(int64_t n, int64_t k, int64_t p) {
  return p * (n / k) + std::min(p, n % k);
}

// K depends on the sizes only, so the summation order does too. (K - 1) * s < n keeps the
// extra buffers below the input's size.
inline int64_t countsketch_parts(int64_t n, int64_t s) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxParts, n / s));
}

at::Tensor countsketch_cpu(const at::Tensor& x, int64_t sketch_size, int64_t seed) {
  check_countsketch_args(x, sketch_size, seed);
  const int64_t n = x.numel(), s = sketch_size;
  at::Tensor out = at::zeros({s}, x.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int64_t parts = countsketch_parts(n, s);
  at::Tensor partial = parts > 1 ? at::zeros({parts - 1, s}, out.options()) : at::Tensor();
  float* po = out.mutable_data_ptr<float>();
  float* pp = parts > 1 ? partial.mutable_data_ptr<float>() : nullptr;
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t us = static_cast<uint32_t>(s);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "countsketch", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // Part p adds its inputs in index order into its own buffer (part 0: the output).
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* acc = p == 0 ? po : pp + (p - 1) * s;
        for_each_words(part_start(n, parts, p), part_start(n, parts, p + 1), useed,
                       kTagCountSketch, [&](int64_t j, const uint32_t* w) {
                         acc[countsketch_bucket(w, us)] +=
                             static_cast<float>(px[j]) * countsketch_sign(w);
                       });
      }
    });
  });
  if (parts > 1) {  // out = ((part 0 + part 1) + part 2) + ...
    at::parallel_for(0, s, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t p = 1; p < parts; ++p) {
        const float* src = pp + (p - 1) * s;
        for (int64_t i = i0; i < i1; ++i) po[i] += src[i];
      }
    });
  }
  return out;
}

at::Tensor countsketch_transpose_cpu(const at::Tensor& y, int64_t numel, int64_t seed) {
  check_countsketch_transpose_args(y, numel, seed);
  at::Tensor out = at::empty({numel}, y.options().dtype(at::kFloat));
  if (numel == 0) return out;
  const uint32_t us = static_cast<uint32_t>(y.numel());
  const uint64_t useed = static_cast<uint64_t>(seed);
  float* po = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "countsketch_t", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t j0, int64_t j1) {
      for_each_words(j0, j1, useed, kTagCountSketch, [&](int64_t j, const uint32_t* w) {
        po[j] = static_cast<float>(py[countsketch_bucket(w, us)]) * countsketch_sign(w);
      });
    });
  });
  return out;
}

// ------------------------------------------------------------------ Walsh-Hadamard

// Stages h = 1 .. len / 2 of the transform of v[0, len), len a power of two, in order.
// Stages 1 and 2 together on groups of 4 (the same butterflies, in the same order).
void fwht_tile(float* v, int64_t len) {
  if (len >= 4) {
    for (int64_t i = 0; i < len; i += 4) {
      float a0 = v[i], a1 = v[i + 1], a2 = v[i + 2], a3 = v[i + 3];
      butterfly(a0, a1);
      butterfly(a2, a3);
      butterfly(a0, a2);
      butterfly(a1, a3);
      v[i] = a0;
      v[i + 1] = a1;
      v[i + 2] = a2;
      v[i + 3] = a3;
    }
  } else if (len == 2) {
    butterfly(v[0], v[1]);
  }
  for (int64_t h = 4; h < len; h *= 2) {
    for (int64_t i = 0; i < len; i += 2 * h) {
      float* __restrict__ a = v + i;
      float* __restrict__ b = v + i + h;
      for (int64_t k = 0; k < h; ++k) {
        const float s = a[k] + b[k], d = a[k] - b[k];
        a[k] = s;
        b[k] = d;
      }
    }
  }
}

// Stages h = tile .. block / 2 over v[0, n): one parallel pass per stage (blocks > kTile).
void fwht_wide_stages(float* v, int64_t n, int64_t tile, int64_t block) {
  for (int64_t h = tile; h < block; h *= 2) {
    at::parallel_for(0, n / 2, kGrain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1;) {  // butterfly p pairs element g 2h + k with g 2h + k + h
        const int64_t g = p / h, k = p % h, run = std::min(p1 - p, h - k);
        float* __restrict__ a = v + g * 2 * h + k;
        float* __restrict__ b = a + h;
        for (int64_t r = 0; r < run; ++r) {
          const float s = a[r] + b[r], d = a[r] - b[r];
          a[r] = s;
          b[r] = d;
        }
        p += run;
      }
    });
  }
}

// ------------------------------------------------------------------ SRHT

at::Tensor srht_cpu(const at::Tensor& x, int64_t sketch_size, int64_t block, int64_t seed) {
  const int64_t n = check_srht_args(x, sketch_size, block, seed);
  const int64_t numel = x.numel(), s = sketch_size;
  if (numel == 0) return at::zeros({s}, x.options().dtype(at::kFloat));
  const int64_t tile = std::min(block, kTile);
  const float scale = srht_scale(n, s, block);
  const uint64_t useed = static_cast<uint64_t>(seed);
  // With s == n every row is kept in order, so the transform is done in the output itself.
  at::Tensor out = at::empty({s}, x.options().dtype(at::kFloat));
  at::Tensor v = s == n ? out : at::empty({n}, out.options());
  float* pv = v.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "srht", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // v = D pad(x), then the stages inside each tile while it is in L1.
    at::parallel_for(0, n / tile, std::max<int64_t>(1, kGrain / tile), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * tile, e = std::min(b + tile, numel);
        for_each_words(b, e, useed, kTagSrhtSign, [&](int64_t j, const uint32_t* w) {
          pv[j] = static_cast<float>(px[j]) * sign_of_bit(w[0]);
        });
        std::fill(pv + std::max(b, e), pv + b + tile, 0.f);
        fwht_tile(pv + b, tile);
      }
    });
  });
  fwht_wide_stages(pv, n, tile, block);
  float* po = out.mutable_data_ptr<float>();
  if (s == n) {
    at::parallel_for(0, s, kGrain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) po[k] = pv[k] * scale;
    });
  } else {
    const uint32_t un = static_cast<uint32_t>(n);
    at::parallel_for(0, s, kGrain, [&](int64_t k0, int64_t k1) {
      for_each_words(k0, k1, useed, kTagSrhtRow, [&](int64_t k, const uint32_t* w) {
        po[k] = pv[srht_row_from_words(w, un)] * scale;
      });
    });
  }
  return out;
}

at::Tensor srht_transpose_cpu(const at::Tensor& y, int64_t numel, int64_t block, int64_t seed) {
  const int64_t n = check_srht_transpose_args(y, numel, block, seed);
  const int64_t s = y.numel();
  if (numel == 0) return at::empty({0}, y.options().dtype(at::kFloat));
  const int64_t tile = std::min(block, kTile);
  const float scale = srht_scale(n, s, block);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t un = static_cast<uint32_t>(n);
  // Sampled rows first (one Philox call each), so the scatter below can be split by
  // destination: each task owns a range of v and adds its rows in k order, like the reference.
  at::Tensor rows;
  if (s != n) {
    rows = at::empty({s}, y.options().dtype(at::kInt));
    int32_t* pr = rows.mutable_data_ptr<int32_t>();
    at::parallel_for(0, s, kGrain, [&](int64_t k0, int64_t k1) {
      for_each_words(k0, k1, useed, kTagSrhtRow, [&](int64_t k, const uint32_t* w) {
        pr[k] = static_cast<int32_t>(srht_row_from_words(w, un));
      });
    });
  }
  at::Tensor v = at::empty({n}, y.options().dtype(at::kFloat));
  float* pv = v.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "srht_t", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const int32_t* pr = s != n ? rows.const_data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, n / tile, std::max<int64_t>(1, kGrain / tile), [&](int64_t t0, int64_t t1) {
      const int64_t lo = t0 * tile, hi = t1 * tile;
      std::fill(pv + lo, pv + hi, 0.f);
      if (pr == nullptr) {  // s == n: row k is k
        for (int64_t k = lo; k < hi; ++k) pv[k] += static_cast<float>(py[k]) * scale;
      } else {
        for (int64_t k = 0; k < s; ++k) {
          const int64_t r = pr[k];
          if (r >= lo && r < hi) pv[r] += static_cast<float>(py[k]) * scale;
        }
      }
      for (int64_t t = t0; t < t1; ++t) fwht_tile(pv + t * tile, tile);
    });
  });
  fwht_wide_stages(pv, n, tile, block);
  at::Tensor out = n == numel ? v : at::empty({numel}, v.options());
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t j0, int64_t j1) {
    for_each_words(j0, j1, useed, kTagSrhtSign, [&](int64_t j, const uint32_t* w) {
      po[j] = pv[j] * sign_of_bit(w[0]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CPU, m) {
  m.impl("countsketch", &countsketch_cpu);
  m.impl("countsketch_transpose", &countsketch_transpose_cpu);
  m.impl("srht", &srht_cpu);
  m.impl("srht_transpose", &srht_transpose_cpu);
}

}  // namespace commcomp
