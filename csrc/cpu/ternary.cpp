// CPU kernels of the ternary codec: ternarize (to 2-bit packed bytes or int8 codes), unpack,
// and the fused multi-rank unpack_accumulate. The bit-level rules are in csrc/ternary.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ternary.h"
#include "philox_batch.h"
#include "segments.h"

namespace commcomp {
namespace {

constexpr int64_t kGrainBytes = 4096;  // 16 Ki elements per task: fixed, so results never
                                       // depend on the number of threads.
constexpr int64_t kTile = 1024;        // elements per unpack_accumulate tile (fits in L1)

// The four decoded fields of every byte value.
struct DecodeTable {
  float v[256][4];
  DecodeTable() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 4; ++k) v[b][k] = decode2(static_cast<uint32_t>(b), k);
  }
};
const DecodeTable kDecodeTable;

// Codes of x[0, len) (one segment, scale s), global index of x[0] = g0. After a head that
// brings the global index to a multiple of 4, runs of 4 * kLanes elements share one batched
// Philox call; the head and the tail draw one counter at a time.
template <typename scalar_t>
void ternary_run(const scalar_t* x, int64_t len, float s, uint64_t seed, uint64_t g0,
                 int8_t* codes) {
  PhiloxStream rng(seed);  // for a misaligned head and the tail: one counter at a time
  int64_t i = 0;
  for (const int64_t head = std::min<int64_t>(len, (4 - (g0 & 3u)) & 3u); i < head; ++i) {
    codes[i] = static_cast<int8_t>(
        ternary_code(static_cast<float>(x[i]), s, rng.word(g0 + static_cast<uint64_t>(i))));
  }
  {  // (g0 + i) % 4 == 0 from here
    PhiloxBatch rb;
    for (; i + 4 * kLanes <= len; i += 4 * kLanes) {
      philox_batch((g0 + i) >> 2, seed, rb);
      for (int e = 0; e < 4 * kLanes; ++e) {
        codes[i + e] = static_cast<int8_t>(ternary_code(static_cast<float>(x[i + e]), s, rb.w[e]));
      }
    }
  }
  for (; i < len; ++i) {
    codes[i] = static_cast<int8_t>(
        ternary_code(static_cast<float>(x[i]), s, rng.word(g0 + static_cast<uint64_t>(i))));
  }
}

inline uint8_t pack4(const int8_t* c) {
  return static_cast<uint8_t>(encode2(c[0]) | (encode2(c[1]) << 2) | (encode2(c[2]) << 4) |
                              (encode2(c[3]) << 6));
}

template <typename scalar_t, bool kPack>
void ternarize_impl(const scalar_t* x, int64_t n, const float* scales,
                    const std::vector<int64_t>& off, uint64_t seed, uint64_t offset,
                    uint8_t* packed, int8_t* codes) {
  at::parallel_for(0, packed_bytes(n), kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t i_begin = b0 * 4, i_end = std::min(b1 * 4, n);
    // Pack mode draws codes into a task-local buffer, then packs them (i_begin % 4 == 0).
    std::vector<int8_t> local(kPack ? static_cast<size_t>(i_end - i_begin + 3) : 0, 0);
    int8_t* dst = kPack ? local.data() : codes + i_begin;  // dst[i - i_begin] <-> x[i]
    SegmentCursor seg(off, i_begin);
    for (int64_t i = i_begin; i < i_end;) {
      const float s = scales[seg.at(i)];
      const int64_t stop = std::min(i_end, seg.end());
      ternary_run(x + i, stop - i, s, seed, offset + static_cast<uint64_t>(i), dst + (i - i_begin));
      i = stop;
    }
    if (kPack) {
      for (int64_t b = b0; b < b1; ++b) packed[b] = pack4(dst + 4 * (b - b0));
    }
  });
}

at::Tensor ternarize_cpu(const at::Tensor& x, const at::Tensor& scales,
                         at::OptionalIntArrayRef segments, int64_t seed, int64_t offset,
                         bool pack) {
  const auto off = check_ternarize_args(x, scales, segments, seed, offset);
  const int64_t n = x.numel();
  at::Tensor out = pack ? at::empty({packed_bytes(n)}, x.options().dtype(at::kByte))
                        : at::empty({n}, x.options().dtype(at::kChar));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternarize", [&] {
    if (pack) {
      ternarize_impl<scalar_t, true>(x.const_data_ptr<scalar_t>(), n,
                                     scales.const_data_ptr<float>(), off, seed, offset,
                                     out.mutable_data_ptr<uint8_t>(), nullptr);
    } else {
      ternarize_impl<scalar_t, false>(x.const_data_ptr<scalar_t>(), n,
                                      scales.const_data_ptr<float>(), off, seed, offset,
                                      nullptr, out.mutable_data_ptr<int8_t>());
    }
  });
  return out;
}

at::Tensor ternarize_pack_cpu(const at::Tensor& x, const at::Tensor& scales,
                              at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cpu(x, scales, segments, seed, offset, /*pack=*/true);
}

at::Tensor ternarize_int8_cpu(const at::Tensor& x, const at::Tensor& scales,
                              at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cpu(x, scales, segments, seed, offset, /*pack=*/false);
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t numel, const at::Tensor& scales,
                      at::OptionalIntArrayRef segments, at::ScalarType dtype) {
  const auto off = check_unpack_args(packed, numel, scales, segments, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, packed_bytes(numel), kGrainBytes, [&](int64_t b0, int64_t b1) {
      const int64_t i_end = std::min(b1 * 4, numel);
      SegmentCursor seg(off, b0 * 4);
      for (int64_t i = b0 * 4; i < i_end;) {
        const float s = sc[seg.at(i)];
        const int64_t stop = std::min(i_end, seg.end());
        for (; i < stop && (i & 3); ++i) {
          o[i] = static_cast<scalar_t>(kDecodeTable.v[p[i >> 2]][i & 3] * s);
        }
        for (; i + 4 <= stop; i += 4) {  // whole bytes
          const float* c = kDecodeTable.v[p[i >> 2]];
          for (int k = 0; k < 4; ++k) o[i + k] = static_cast<scalar_t>(c[k] * s);
        }
        for (; i < stop; ++i) {
          o[i] = static_cast<scalar_t>(kDecodeTable.v[p[i >> 2]][i & 3] * s);
        }
      }
    });
  });
  return out;
}

void unpack_accumulate_cpu(const at::Tensor& packed, const at::Tensor& scales,
                           at::OptionalIntArrayRef segments, const at::Tensor& out) {
  const auto off = check_unpack_accumulate_args(packed, scales, segments, out);
  const int64_t numel = out.numel(), rows = packed.size(0);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  if (numel == 0 || rows == 0) return;
  const int64_t nbytes = packed_bytes(numel);
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unpack_acc", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (numel + kTile - 1) / kTile, 4, [&](int64_t t0, int64_t t1) {
      float acc[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * kTile, i1 = std::min(i0 + kTile, numel);
        std::fill(acc, acc + (i1 - i0), 0.f);
        // Rank by rank, in order: acc = ((0 + s_0 c_0) + s_1 c_1) + ..., then out += acc.
        for (int64_t w = 0; w < rows; ++w) {
          const uint8_t* pw = p + w * nbytes;
          const float* sw = sc + w * nseg;
          SegmentCursor seg(off, i0);
          for (int64_t i = i0; i < i1;) {
            const float s = sw[seg.at(i)];
            const int64_t stop = std::min(i1, seg.end());
            for (; i < stop && (i & 3); ++i) {
              acc[i - i0] += decode2(pw[i >> 2], static_cast<int>(i & 3)) * s;
            }
            for (; i + 4 <= stop; i += 4) {  // whole bytes: four fields from the table
              const float* c = kDecodeTable.v[pw[i >> 2]];
              float* a = acc + (i - i0);
              a[0] += c[0] * s;
              a[1] += c[1] * s;
              a[2] += c[2] * s;
              a[3] += c[3] * s;
            }
            for (; i < stop; ++i) {
              acc[i - i0] += decode2(pw[i >> 2], static_cast<int>(i & 3)) * s;
            }
          }
        }
        for (int64_t i = i0; i < i1; ++i) {
          o[i] = static_cast<scalar_t>(static_cast<float>(o[i]) + acc[i - i0]);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CPU, m) {
  m.impl("ternarize_pack", &ternarize_pack_cpu);
  m.impl("ternarize_int8", &ternarize_int8_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("unpack_accumulate", &unpack_accumulate_cpu);
}

}  // namespace commcomp
