// Base-3 packing of ternary codes, shared by the CPU and CUDA kernels (and restated in
// commcomp/ops/reference.py, pack_base3 / unpack_base3_codes):
//
//   five codes per byte (3^5 = 243 <= 256, 1.6 bits per element): element 5k + j of a payload
//   is the base-3 digit code + 1 (0, 1 or 2) of weight 3^j in byte k, i.e.
//   byte k = sum_{j < 5} (code[5k + j] + 1) * 3^j; the last byte is padded with code 0
//   (digit 1). A byte b >= 243 is never written; it decodes as b - 243.
//
// ceil(n / 5) bytes hold n codes.
#pragma once
#include <cstdint>

#include "ternary.h"

namespace commcomp {

constexpr int kBase3Codes = 5;  // codes per byte

// The byte of five codes c[0..4] (each -1, 0 or +1).
COMMCOMP_HD uint32_t base3_byte(const int c[5]) {
  return static_cast<uint32_t>((c[0] + 1) + 3 * (c[1] + 1) + 9 * (c[2] + 1) + 27 * (c[3] + 1) +
                               81 * (c[4] + 1));
}

// The five codes of a byte (b >= 243 read as b - 243).
COMMCOMP_HD void base3_codes(uint32_t byte, int c[5]) {
  uint32_t b = byte & 0xFFu;
  if (b >= 243u) b -= 243u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 5; ++j) {
    c[j] = static_cast<int>(b % 3u) - 1;
    b /= 3u;
  }
}

}  // namespace commcomp
