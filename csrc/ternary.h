// Shared host/device building blocks of the ternary codec.
//
// Everything that decides a bit of output lives here, once, so that the CPU kernel
// (csrc/cpu/ternary.cpp), the CUDA kernel (csrc/cuda/ternary.cu) and the pure-PyTorch twin
// (commcomp/ops/reference.py) follow one specification, version kTernarySpecVersion = 2
// (commcomp.ops.TERNARY_SPEC_VERSION; the loader refuses a compiled library of another one):
//
//   element i of a call with (seed, offset) has global index g = offset + i;
//   (w0, w1, w2, w3) = Philox4x32-10(counter = (lo32(g >> 3), hi32(g >> 3), 0, 0),
//                                     key     = (lo32(seed),   hi32(seed)));
//   r = w[(g >> 1) & 3];  h = (g & 1) ? (r >> 16) : (r & 0xFFFF)   (8 elements per call)
//   u = h * 2^-16  (exact, uniform on [0, 1) with 16 bits)
//   a = min(|x|, s)  (NaN propagates);  nonzero = (u * s < a)  (one fp32 rounding, no FMA)
//   code = nonzero ? sign(x) : 0;  2-bit encoding 0 -> 0b00, +1 -> 0b01, -1 -> 0b10,
//   element 4j+k of a call in bits 2k..2k+1 of byte j (unused trailing bits are zero).
//
// P(code != 0) = ceil(2^16 * a / s) / 2^16, up to the rounding of u * s, which can only lift
// the one draw next to a / s onto a (and so drop it); either way |P - a / s| < 2^-16, so
// E[s * code] = clip(x, -s, s) up to a bias below 2^-16 * s per element (8 elements per
// Philox call). Version 1 drew one 32-bit word per element (counter g >> 2, word g & 3,
// u = (r >> 8) * 2^-24; bias below 2^-24 * s) at twice the Philox calls, which were nearly
// all of the CPU kernel's time.
// Why 2^-16 * s is negligible: the codec's variance per element is s|x| - x^2 = s^2 p (1 - p)
// with p = min(|x|, s) / s. P is a multiple of 2^-16, so an element whose code is random has
// 2^-16 <= P <= 1 - 2^-16 and a standard deviation >= 2^-8 s (1 - 2^-16)^(1/2): more than 250
// times the bias bound (65535 times in squares). An element whose code is certain is either
// 0 (x = 0: no bias) or sign(x) for |x| > (1 - 2^-16) s (off by less than 2^-16 s). Over a
// layer of d elements the squared bias, at most d 2^-32 s^2, is lost in the summed variance
// s ||x||_1 - ||x||^2 unless nearly every value is within 2^-16 s of 0 or of +-s.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define COMMCOMP_HD __host__ __device__ __forceinline__
#else
#define COMMCOMP_HD inline
#endif

namespace commcomp {

// Version of the specification above; bumped whenever a bit of output changes.
constexpr int kTernarySpecVersion = 2;

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPowMinus16 = 1.52587890625e-05f;

COMMCOMP_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the generator behind torch's CUDA RNG.
// counter = (lo32(ctr), hi32(ctr), tag, 0), key = (lo32(seed), hi32(seed)). The ternary codec
// uses tag 0; the sketches (csrc/sketch.h) use their own tags, i.e. independent streams.
COMMCOMP_HD void philox4x32_10(uint64_t ctr, uint64_t seed, uint32_t out[4], uint32_t tag = 0u) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
  uint32_t c2 = tag, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

COMMCOMP_HD uint32_t select_word(const uint32_t w[4], uint64_t j) {
  // A switch on a value keeps w in registers on the GPU (no run-time array index).
  switch (static_cast<uint32_t>(j & 3u)) {
    case 0: return w[0];
    case 1: return w[1];
    case 2: return w[2];
    default: return w[3];
  }
}

// The 16-bit draw h of global index g from the words w of its counter g >> 3: half g & 1
// (low half first) of word (g >> 1) & 3.
COMMCOMP_HD uint32_t select_draw16(const uint32_t w[4], uint64_t g) {
  const uint32_t r = select_word(w, g >> 1);
  return (g & 1u) ? (r >> 16) : (r & 0xFFFFu);
}

// Ternary code of one value against scale s >= 0 with 16-bit draw h (h < 2^16). Branch-free,
// so the CPU loops vectorize. A nonzero code implies |x| > 0, so its sign is
// (x > 0) - (x < 0).
COMMCOMP_HD int ternary_code(float x, float s, uint32_t h) {
  const float ax = x < 0.f ? -x : x;
  const float a = ax > s ? s : ax;                          // min(|x|, s); NaN stays NaN
  const float u = static_cast<float>(h) * kTwoPowMinus16;   // exact
  const float t = u * s;                                    // one rounding, no FMA
  return static_cast<int>(t < a) * (static_cast<int>(x > 0.f) - static_cast<int>(x < 0.f));
}

COMMCOMP_HD uint32_t encode2(int code) {
  return static_cast<uint32_t>(code > 0) | (static_cast<uint32_t>(code < 0) << 1);
}

// Decode field k (0..3) of a packed byte: 0b01 -> +1, 0b10 -> -1, 0b00 and 0b11 -> 0.
COMMCOMP_HD float decode2(uint32_t byte, int k) {
  const uint32_t b = byte >> (2 * k);
  return static_cast<float>(static_cast<int>(b & 1u) - static_cast<int>((b >> 1) & 1u));
}

// Draws the 16-bit draws of increasing global indices, calling Philox once per counter
// (8 consecutive indices share one).
struct PhiloxStream {
  uint64_t seed;
  uint64_t ctr = ~0ull;  // never a counter: g >> 3 < 2^61
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  COMMCOMP_HD explicit PhiloxStream(uint64_t s) : seed(s) {}
  COMMCOMP_HD uint32_t draw16(uint64_t g) {
    if ((g >> 3) != ctr) {
      ctr = g >> 3;
      philox4x32_10(ctr, seed, w);
    }
    return select_draw16(w, g);
  }
};

}  // namespace commcomp
