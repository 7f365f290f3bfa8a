// Shared host/device building blocks of the sketch operators (CountSketch and block SRHT).
//
// A sketch is a linear map R (s x d) with E[R^T R] = I that is never materialized: every entry
// is drawn on the fly from Philox4x32-10 (csrc/ternary.h) keyed by the shared seed, so all
// ranks, the CPU kernel (csrc/cpu/sketch.cpp), the CUDA kernel (csrc/cuda/sketch.cu) and the
// pure-PyTorch twin (commcomp/ops/reference.py) agree on R:
//
//   W(j, tag) = Philox4x32-10(counter = (lo32(j), hi32(j), tag, 0),
//                             key     = (lo32(seed), hi32(seed)))      one call per index j
//   uniform_index(w0, w1, m) = floor((w1 * 2^32 + w0) * m / 2^64)      in [0, m), m < 2^31
//                            = (w1 * m + ((w0 * m) >> 32)) >> 32       exact in 64 bits
//
// CountSketch (Charikar et al. 2002), x of d elements, sketch of s:
//   w = W(j, TAG_COUNTSKETCH);  h(j) = uniform_index(w0, w1, s);  sign(j) = 1 - 2 (w2 & 1)
//   countsketch:           y[h(j)] += sign(j) * x[j]   (float32; summation order free)
//   countsketch_transpose: out[j] = sign(j) * y[h(j)]  (one product: bit-exact everywhere)
//
// Block SRHT (Ailon & Chazelle 2006), block B a power of two, n = ceil(d / B) * B:
//   D: sign(j) = 1 - 2 (W(j, TAG_SRHT_SIGN).w0 & 1) for j < d; pad(x) has zeros after d
//   H: unnormalized Walsh-Hadamard transform of each block of B, stages h = 1, 2, 4, ...,
//      B / 2 in that order, each (a, b) -> (a + b, a - b) in float32. Any schedule that
//      keeps the stage order (cache blocking, registers, shared memory) rounds identically.
//   P: row(k) = k when s == n (R is then orthogonal), else
//      uniform_index(W(k, TAG_SRHT_ROW).w0, .w1, n)   (with replacement: E[P^T P] = s/n I)
//   scale = float32(sqrt(n / s) / sqrt(B)), computed in double and rounded once
//   srht:           y[k] = H(D pad(x))[row(k)] * scale                 (bit-exact everywhere)
//   srht_transpose: v = 0; v[row(k)] += y[k] * scale (k in order); out = D H(v)[0, d)
//
// d == 0 gives zeros (forward) or an empty tensor (transpose) for any s >= 1.
#pragma once
#include <cmath>
#include <cstdint>

#include "ternary.h"

namespace commcomp {

constexpr uint32_t kTagCountSketch = 0x43534B31u;  // "CSK1"
constexpr uint32_t kTagSrhtSign = 0x53524431u;     // "SRD1"
constexpr uint32_t kTagSrhtRow = 0x53525231u;      // "SRR1"

constexpr int64_t kMaxSketchLength = int64_t{1} << 31;  // sketch sizes and padded n are below
constexpr int64_t kMaxSrhtBlock = int64_t{1} << 24;

// floor(u * m / 2^64) for u = w1 * 2^32 + w0, i.e. the high word of a 64 x 32-bit product.
COMMCOMP_HD uint32_t uniform_index(uint32_t w0, uint32_t w1, uint32_t m) {
  const uint64_t lo = (static_cast<uint64_t>(w0) * m) >> 32;
  return static_cast<uint32_t>((static_cast<uint64_t>(w1) * m + lo) >> 32);
}

// +1.f or -1.f from the lowest bit of a random word.
COMMCOMP_HD float sign_of_bit(uint32_t w) { return 1.f - 2.f * static_cast<float>(w & 1u); }

// Bucket and sign of input j of a CountSketch of size s, from its words W(j, TAG_COUNTSKETCH).
COMMCOMP_HD uint32_t countsketch_bucket(const uint32_t w[4], uint32_t s) {
  return uniform_index(w[0], w[1], s);
}
COMMCOMP_HD float countsketch_sign(const uint32_t w[4]) { return sign_of_bit(w[2]); }

COMMCOMP_HD float countsketch_sign_at(uint64_t j, uint64_t seed, uint32_t& bucket, uint32_t s) {
  uint32_t w[4];
  philox4x32_10(j, seed, w, kTagCountSketch);
  bucket = countsketch_bucket(w, s);
  return countsketch_sign(w);
}

// D of the SRHT: the sign of input j.
COMMCOMP_HD float srht_sign(uint64_t j, uint64_t seed) {
  uint32_t w[4];
  philox4x32_10(j, seed, w, kTagSrhtSign);
  return sign_of_bit(w[0]);
}

// P of the SRHT: the padded-input row that output k samples.
COMMCOMP_HD uint32_t srht_row_from_words(const uint32_t w[4], uint32_t n) {
  return uniform_index(w[0], w[1], n);
}
COMMCOMP_HD uint32_t srht_row(uint64_t k, uint64_t seed, uint32_t n, uint32_t s) {
  if (s == n) return static_cast<uint32_t>(k);
  uint32_t w[4];
  philox4x32_10(k, seed, w, kTagSrhtRow);
  return srht_row_from_words(w, n);
}

// One butterfly of a Walsh-Hadamard stage. Kept as two separate roundings on every backend.
COMMCOMP_HD void butterfly(float& a, float& b) {
#if defined(__CUDA_ARCH__)
  const float s = __fadd_rn(a, b), d = __fsub_rn(a, b);
#else
  const float s = a + b, d = a - b;
#endif
  a = s;
  b = d;
}

// Host only: padded length and the output scale. std::pow(v, 0.5) is what the reference's
// `v ** 0.5` calls (CPython's float pow), so the double and its float32 rounding agree.
inline int64_t srht_padded(int64_t numel, int64_t block) {
  return (numel / block + (numel % block != 0 ? 1 : 0)) * block;
}

inline float srht_scale(int64_t n, int64_t s, int64_t block) {
  const double r = std::pow(static_cast<double>(n) / static_cast<double>(s), 0.5) /
                   std::pow(static_cast<double>(block), 0.5);
  return static_cast<float>(r);
}

}  // namespace commcomp
