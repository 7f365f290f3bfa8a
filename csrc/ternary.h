// Shared host/device building blocks of the ternary codec.
//
// Everything that decides a bit of output lives here, once, so that the CPU kernel
// (csrc/cpu/ternary.cpp), the CUDA kernel (csrc/cuda/ternary.cu) and the pure-PyTorch twin
// (commcomp/ops/reference.py) follow one specification:
//
//   element i of a call with (seed, offset) has global index g = offset + i;
//   (w0, w1, w2, w3) = Philox4x32-10(counter = (lo32(g >> 2), hi32(g >> 2), 0, 0),
//                                     key     = (lo32(seed),   hi32(seed)));
//   r = w[g & 3];  u = (r >> 8) * 2^-24  (exact, uniform on [0, 1) with 24 bits)
//   a = min(|x|, s)  (NaN propagates);  nonzero = (u * s < a)  (one fp32 rounding)
//   code = nonzero ? sign(x) : 0;  2-bit encoding 0 -> 0b00, +1 -> 0b01, -1 -> 0b10,
//   element 4j+k of a call in bits 2k..2k+1 of byte j (unused trailing bits are zero).
//
// P(code != 0) = ceil(2^24 * a / s) / 2^24, so E[s * code] = clip(x, -s, s) up to 2^-24 * s.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define COMMCOMP_HD __host__ __device__ __forceinline__
#else
#define COMMCOMP_HD inline
#endif

namespace commcomp {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;

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

COMMCOMP_HD uint32_t select_word(const uint32_t w[4], uint64_t g) {
  // A switch on a value keeps w in registers on the GPU (no run-time array index).
  switch (static_cast<uint32_t>(g & 3u)) {
    case 0: return w[0];
    case 1: return w[1];
    case 2: return w[2];
    default: return w[3];
  }
}

// Ternary code of one value against scale s >= 0 with random word r. Branch-free, so the
// CPU loops vectorize. A nonzero code implies |x| > 0, so its sign is (x > 0) - (x < 0).
COMMCOMP_HD int ternary_code(float x, float s, uint32_t r) {
  const float ax = x < 0.f ? -x : x;
  const float a = ax > s ? s : ax;                              // min(|x|, s); NaN stays NaN
  const float u = static_cast<float>(r >> 8) * kTwoPowMinus24;  // exact
  const float t = u * s;                                        // one rounding, no FMA
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

// Draws random words for consecutive global indices, calling Philox once per counter.
struct PhiloxStream {
  uint64_t seed;
  uint64_t ctr = ~0ull;
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  COMMCOMP_HD explicit PhiloxStream(uint64_t s) : seed(s) {}
  COMMCOMP_HD uint32_t word(uint64_t g) {
    if ((g >> 2) != ctr) {
      ctr = g >> 2;
      philox4x32_10(ctr, seed, w);
    }
    return select_word(w, g);
  }
};

}  // namespace commcomp
