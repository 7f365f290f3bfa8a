// Decoded codes of every byte value, for the CPU kernels that read payloads (2-bit packing of
// csrc/ternary.h, base-3 packing of csrc/base3.h), and the loops that expand a run of payload
// bytes into one float code per element.
#pragma once
#include <cstdint>
#include <cstring>

#include "../base3.h"
#include "../ternary.h"

namespace commcomp {

// The four decoded fields of every 2-bit byte value.
struct DecodeTable {
  float v[256][4];
  DecodeTable() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) v[b][k] = decode2(static_cast<uint32_t>(b), k);
  }
};

// The five codes of every base-3 byte value, as floats, each row padded to eight (zeros) so
// that a row is copied with two 16-byte moves: a row written at element 5k is overwritten from
// 5k + 5 on by the next byte's row.
struct Base3Table {
  alignas(32) float v[256][8];
  Base3Table() {
    for (int b = 0; b < 256; ++b) {
      int c[5];
      base3_codes(static_cast<uint32_t>(b), c);
      for (int j = 0; j < 8; ++j) v[b][j] = j < 5 ? static_cast<float>(c[j]) : 0.f;
    }
  }
};

// The five codes of every base-3 byte in floats 3..7 of a row of 12 (zeros around them), so
// that 4 floats loaded at 3 - k and 7 - k place them at lanes k .. k + 4 of two vectors.
struct Base3ShiftTable {
  alignas(16) float v[256][12];
  Base3ShiftTable() {
    for (int b = 0; b < 256; ++b) {
      int c[5];
      base3_codes(static_cast<uint32_t>(b), c);
      for (int j = 0; j < 12; ++j) v[b][j] = (j >= 3 && j < 8) ? static_cast<float>(c[j - 3]) : 0.f;
    }
  }
};

inline const DecodeTable kDecodeTable;
inline const Base3Table kBase3Table;
inline const Base3ShiftTable kBase3ShiftTable;

// out[4k + f] = field f of p[k] for k < nbytes.
inline void expand_2bit(const uint8_t* p, int64_t nbytes, float* out) {
  for (int64_t k = 0; k < nbytes; ++k) std::memcpy(out + 4 * k, kDecodeTable.v[p[k]], 16);
}

// out[5k + j] = code j of p[k] for k < nbytes; writes out[0, 5 nbytes + 3).
inline void expand_base3(const uint8_t* p, int64_t nbytes, float* out) {
  for (int64_t k = 0; k < nbytes; ++k) std::memcpy(out + 5 * k, kBase3Table.v[p[k]], 32);
}

}  // namespace commcomp
