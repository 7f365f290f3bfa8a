// Host-side argument checks shared by every backend. They run before any kernel touches
// memory, so a bad call fails with an error that names the argument instead of reading out
// of bounds. Value checks that would need a device sync (NaN, scale <= 0 with data) live in
// commcomp/ops/__init__.py, where the caller can switch them off on a hot path.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

namespace commcomp {

inline void check_float_input(const at::Tensor& x, const char* name) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "commcomp: ", name,
              " must be float32, float16 or bfloat16, got ", dt,
              "; convert it with .float() first");
  TORCH_CHECK(x.is_contiguous(), "commcomp: ", name,
              " must be contiguous (got strides ", x.strides(), "); pass ", name,
              ".contiguous()");
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "commcomp: ", an, " is on ", a.device(), " but ", bn,
              " is on ", b.device(), "; move them to one device");
}

// Cumulative offsets [0, l0, l0+l1, ..., n] of the segment lengths; one segment if none.
inline std::vector<int64_t> segment_offsets(at::OptionalIntArrayRef segments, int64_t n) {
  std::vector<int64_t> off{0};
  if (!segments.has_value()) {
    off.push_back(n);
    return off;
  }
  TORCH_CHECK(!segments->empty(), "commcomp: segments must name at least one length (got an ",
              "empty list); pass None for a single segment");
  off.reserve(segments->size() + 1);
  for (size_t k = 0; k < segments->size(); ++k) {
    const int64_t len = (*segments)[k];
    TORCH_CHECK(len >= 0, "commcomp: segments[", k, "] = ", len, " is negative; segment ",
                "lengths must be >= 0");
    TORCH_CHECK(len <= n - off.back(), "commcomp: segments[0..", k, "] already sum to more ",
                "than the ", n, " elements of the tensor; the lengths must cover it exactly");
    off.push_back(off.back() + len);
  }
  TORCH_CHECK(off.back() == n, "commcomp: segments sum to ", off.back(), " but the tensor has ",
              n, " elements; the lengths must cover it exactly");
  return off;
}

inline void check_scales(const at::Tensor& scales, int64_t rows, int64_t nseg,
                         const at::Tensor& like, const char* like_name,
                         const char* name = "scales") {
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "commcomp: ", name, " must be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(scales.is_contiguous(), "commcomp: ", name, " must be contiguous; pass ", name,
              ".contiguous()");
  TORCH_CHECK(scales.numel() == rows * nseg, "commcomp: ", name, " has ", scales.numel(),
              " elements but ", rows * nseg, " are needed (", rows, " row(s) x ", nseg,
              " segment(s))");
  check_same_device(scales, name, like, like_name);
}

inline void check_seed_offset(int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, "commcomp: seed must be >= 0, got ", seed);
  TORCH_CHECK(offset >= 0, "commcomp: offset must be >= 0, got ", offset);
}

inline int64_t packed_bytes(int64_t n) { return (n + 3) / 4; }

inline void check_packed(const at::Tensor& packed, int64_t rows, int64_t numel) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "commcomp: packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(), "commcomp: packed must be contiguous; pass packed.contiguous()");
  TORCH_CHECK(packed.numel() == rows * packed_bytes(numel), "commcomp: packed has ",
              packed.numel(), " bytes but ", rows, " payload(s) of ", numel,
              " elements need ", rows * packed_bytes(numel), " (ceil(numel / 4) each)");
}

// The checks of each op, shared by every backend; each returns the segment offsets.
inline std::vector<int64_t> check_ternarize_args(const at::Tensor& x, const at::Tensor& scales,
                                                 at::OptionalIntArrayRef segments, int64_t seed,
                                                 int64_t offset) {
  check_float_input(x, "x");
  check_seed_offset(seed, offset);
  auto off = segment_offsets(segments, x.numel());
  check_scales(scales, 1, static_cast<int64_t>(off.size()) - 1, x, "x");
  return off;
}

inline std::vector<int64_t> check_unpack_args(const at::Tensor& packed, int64_t numel,
                                              const at::Tensor& scales,
                                              at::OptionalIntArrayRef segments,
                                              at::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "commcomp: numel must be >= 0, got ", numel);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "commcomp: dtype must be float32, float16 or bfloat16, got ", dtype);
  check_packed(packed, 1, numel);
  auto off = segment_offsets(segments, numel);
  check_scales(scales, 1, static_cast<int64_t>(off.size()) - 1, packed, "packed");
  return off;
}

inline std::vector<int64_t> check_unpack_accumulate_args(const at::Tensor& packed,
                                                         const at::Tensor& scales,
                                                         at::OptionalIntArrayRef segments,
                                                         const at::Tensor& out) {
  check_float_input(out, "out");
  TORCH_CHECK(packed.dim() == 2, "commcomp: packed must be 2-D [world, ceil(numel / 4)], got ",
              packed.dim(), "-D");
  check_packed(packed, packed.size(0), out.numel());
  check_same_device(packed, "packed", out, "out");
  auto off = segment_offsets(segments, out.numel());
  check_scales(scales, packed.size(0), static_cast<int64_t>(off.size()) - 1, out, "out");
  return off;
}

// Base-3 payloads (csrc/base3.h): five codes per byte.
inline int64_t base3_bytes(int64_t n) { return (n + 4) / 5; }

inline std::vector<int64_t> check_unpack_base3_args(const at::Tensor& packed, int64_t numel,
                                                    const at::Tensor& scales,
                                                    at::OptionalIntArrayRef segments,
                                                    at::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "commcomp: numel must be >= 0, got ", numel);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "commcomp: dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "commcomp: packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.is_contiguous(),
              "commcomp: packed must be contiguous; pass packed.contiguous()");
  TORCH_CHECK(packed.numel() == base3_bytes(numel), "commcomp: packed has ", packed.numel(),
              " bytes but numel=", numel, " needs ", base3_bytes(numel), " (ceil(numel / 5))");
  auto off = segment_offsets(segments, numel);
  check_scales(scales, 1, static_cast<int64_t>(off.size()) - 1, packed, "packed");
  return off;
}

// The flat float32 state of the mixing ops (v, hat, acc; y, g, g_prev): contiguous, as many
// elements as the first one (`v_name`), on its device.
inline void check_state(const at::Tensor& v, const char* v_name, const at::Tensor& t,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "commcomp: ", name, " must be a float32 tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "commcomp: ", name, " must be contiguous; pass ", name,
              ".contiguous()");
  TORCH_CHECK(t.numel() == v.numel() && t.device() == v.device(), "commcomp: ", name, " has ",
              t.numel(), " elements on ", t.device(), " but ", v_name, " has ", v.numel(),
              " on ", v.device(), "; the mixing state must match ", v_name);
}

inline std::vector<int64_t> check_mix_stats_args(const at::Tensor& v, const at::Tensor& hat,
                                                 at::OptionalIntArrayRef segments) {
  check_state(v, "v", v, "v");
  check_state(v, "v", hat, "hat");
  return segment_offsets(segments, v.numel());
}

inline std::vector<int64_t> check_mix_encode_args(
    const at::Tensor& v, const at::Tensor& hat, const at::Tensor& acc, const at::Tensor& scales,
    const at::Tensor& hat_scales, const at::Tensor& acc_scales, at::OptionalIntArrayRef segments,
    int64_t seed, int64_t offset) {
  check_state(v, "v", v, "v");
  check_state(v, "v", hat, "hat");
  check_state(v, "v", acc, "acc");
  check_seed_offset(seed, offset);
  auto off = segment_offsets(segments, v.numel());
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  check_scales(scales, 1, nseg, v, "v", "scales");
  check_scales(hat_scales, 1, nseg, v, "v", "hat_scales");
  check_scales(acc_scales, 1, nseg, v, "v", "acc_scales");
  return off;
}

inline std::vector<int64_t> check_mix_decode_args(const at::Tensor& v, const at::Tensor& hat,
                                                  const at::Tensor& acc, at::TensorList packed,
                                                  const at::Tensor& scales,
                                                  at::OptionalIntArrayRef segments, bool base3) {
  check_state(v, "v", v, "v");
  check_state(v, "v", hat, "hat");
  check_state(v, "v", acc, "acc");
  const int64_t n = v.numel();
  const int64_t nbytes = base3 ? base3_bytes(n) : packed_bytes(n);
  for (size_t k = 0; k < packed.size(); ++k) {
    const at::Tensor& p = packed[k];
    TORCH_CHECK(p.scalar_type() == at::kByte, "commcomp: packed[", k, "] must be uint8, got ",
                p.scalar_type());
    TORCH_CHECK(p.is_contiguous(), "commcomp: packed[", k, "] must be contiguous; pass packed[",
                k, "].contiguous()");
    TORCH_CHECK(p.numel() == nbytes && p.device() == v.device(), "commcomp: packed[", k,
                "] has ", p.numel(), " bytes on ", p.device(), "; ", n, " elements need ",
                nbytes, " on ", v.device());
  }
  auto off = segment_offsets(segments, n);
  check_scales(scales, static_cast<int64_t>(packed.size()), static_cast<int64_t>(off.size()) - 1,
               v, "v", "scales");
  return off;
}

inline void check_track_prep_args(const at::Tensor& y, const at::Tensor& g,
                                  const at::Tensor& g_prev) {
  check_state(y, "y", y, "y");
  check_state(y, "y", g, "g");
  check_state(y, "y", g_prev, "g_prev");
}

// The sketch ops (csrc/sketch.h). Messages match commcomp/ops/_checks.py word for word.
inline void check_sketch_size(int64_t s, const char* name = "sketch_size") {
  TORCH_CHECK(s >= 1 && s < (int64_t{1} << 31), "commcomp: ", name, " = ", s,
              " is out of range; allowed 1 <= sketch_size < 2^31; pass a positive sketch size ",
              "below 2^31");
}

inline void check_sketch_numel(int64_t numel) {
  TORCH_CHECK(numel >= 0, "commcomp: numel must be >= 0, got ", numel);
}

// The padded length n = ceil(numel / block) * block, after checking block and n.
inline int64_t check_srht_shape(int64_t numel, int64_t s, int64_t block) {
  TORCH_CHECK(block >= 1 && block <= (int64_t{1} << 24) && (block & (block - 1)) == 0,
              "commcomp: block = ", block, " is not allowed; allowed a power of two in ",
              "[1, 2^24]; pass e.g. commcomp.ops.default_block(numel)");
  const int64_t nblocks = numel / block + (numel % block != 0 ? 1 : 0);
  TORCH_CHECK(nblocks <= ((int64_t{1} << 31) - 1) / block, "commcomp: numel = ", numel,
              " padded to whole blocks of ", block, " is ", nblocks, " blocks, but the padded ",
              "length must be < 2^31; sketch a smaller tensor (split it)");
  const int64_t n = nblocks * block;
  TORCH_CHECK(n == 0 || s <= n, "commcomp: sketch_size = ", s,
              " exceeds the padded length n = ", n, " (numel ", numel, ", block ", block,
              "); allowed 1 <= sketch_size <= n; pass a smaller sketch_size");
  return n;
}

inline void check_countsketch_args(const at::Tensor& x, int64_t s, int64_t seed) {
  check_float_input(x, "x");
  check_sketch_size(s);
  check_seed_offset(seed, 0);
}

inline void check_countsketch_transpose_args(const at::Tensor& y, int64_t numel, int64_t seed) {
  check_float_input(y, "y");
  check_sketch_size(y.numel(), "y.numel()");
  check_sketch_numel(numel);
  check_seed_offset(seed, 0);
}

inline int64_t check_srht_args(const at::Tensor& x, int64_t s, int64_t block, int64_t seed) {
  check_float_input(x, "x");
  check_sketch_size(s);
  check_seed_offset(seed, 0);
  return check_srht_shape(x.numel(), s, block);
}

inline int64_t check_srht_transpose_args(const at::Tensor& y, int64_t numel, int64_t block,
                                         int64_t seed) {
  check_float_input(y, "y");
  check_sketch_size(y.numel(), "y.numel()");
  check_sketch_numel(numel);
  check_seed_offset(seed, 0);
  return check_srht_shape(numel, y.numel(), block);
}

}  // namespace commcomp
