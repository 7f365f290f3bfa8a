// CUDA kernels of the base-3 codec (ternarize_base3, unpack_base3) and of compressed mixing's
// passes over flat float32 state (mix_stats, mix_encode, mix_decode, track_prep). The rules
// are those of commcomp/ops/reference.py, csrc/ternary.h and csrc/base3.h; the results are
// bit-identical to the CPU kernels (csrc/cpu/ternary.cpp, csrc/cpu/mixing.cpp) except
// mix_stats' float64 sums, which are added in another order.
//
// Element-wise kernels give one thread one packed byte (4 elements of a 2-bit payload, 5 of a
// base-3 one) in a grid-stride loop, like csrc/cuda/ternary.cu. Every product and sum that
// decides a bit is written with __fmul_rn / __fadd_rn / __fsub_rn, so nvcc cannot fuse them
// into an FMA (mix_decode's v + gamma * (acc - hat) must round the product first).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../base3.h"
#include "../checks.h"
#include "../stats.h"
#include "../ternary.h"
#include "launch.cuh"

namespace commcomp {
namespace {

using gpu::SegTable;

__device__ __forceinline__ bool is_finite_bits(float x) {
  return (__float_as_uint(x) & 0x7F800000u) != 0x7F800000u;
}

__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// The K codes of a packed byte as floats: K = 4, the 2-bit fields; K = 5, the base-3 digits.
template <int K>
__device__ __forceinline__ void decode_byte(uint32_t byte, float code[K]) {
  if constexpr (K == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) code[k] = decode2(byte, k);
  } else {
    int c[5];
    base3_codes(byte, c);
#pragma unroll
    for (int k = 0; k < 5; ++k) code[k] = static_cast<float>(c[k]);
  }
}

// The byte of K codes (those past the end are 0: zero fields, padding digit 1).
template <int K>
__device__ __forceinline__ uint8_t encode_byte(const int c[K]) {
  if constexpr (K == 4) {
    uint32_t bits = 0u;
#pragma unroll
    for (int k = 0; k < 4; ++k) bits |= encode2(c[k]) << (2 * k);
    return static_cast<uint8_t>(bits);
  } else {
    return static_cast<uint8_t>(base3_byte(c));
  }
}

// ---------------------------------------------------------------- base-3 codec

// Byte b: the codes of elements 5b .. 5b + 4 (those below n), drawn as ternarize_int8's.
template <typename scalar_t>
__global__ void ternarize_base3_kernel(const scalar_t* __restrict__ x, int64_t n,
                                       const float* __restrict__ scales, SegTable seg,
                                       uint64_t seed, uint64_t offset, uint8_t* __restrict__ out) {
  const int64_t nbytes = (n + 4) / 5;
  for (int64_t b = grid_start(); b < nbytes; b += grid_stride()) {
    const int64_t i0 = 5 * b;
    const int cnt = n - i0 < 5 ? static_cast<int>(n - i0) : 5;
    PhiloxStream rng(seed);  // five draws: one counter, or two across a multiple of 8
    int64_t s = seg.find(i0);
    int c[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      c[k] = 0;
      if (k < cnt) {
        const int64_t i = i0 + k;
        s = seg.advance(s, i);
        c[k] = ternary_code(static_cast<float>(x[i]), scales[s],
                            rng.draw16(offset + static_cast<uint64_t>(i)));
      }
    }
    out[b] = encode_byte<5>(c);
  }
}

at::Tensor ternarize_base3_cuda(const at::Tensor& x, const at::Tensor& scales,
                                at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  const auto off = check_ternarize_args(x, scales, segments, seed, offset);
  const int64_t n = x.numel();
  at::Tensor out = at::empty({base3_bytes(n)}, x.options().dtype(at::kByte));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, x.device(), off_holder);
  const int blocks = gpu::grid_size(base3_bytes(n), gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternarize3", [&] {
    ternarize_base3_kernel<scalar_t><<<blocks, gpu::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), n, scales.const_data_ptr<float>(), seg,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
        out.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t>
__global__ void unpack_base3_kernel(const uint8_t* __restrict__ packed, int64_t n,
                                    const float* __restrict__ scales, SegTable seg,
                                    scalar_t* __restrict__ out) {
  const int64_t nbytes = (n + 4) / 5;
  for (int64_t b = grid_start(); b < nbytes; b += grid_stride()) {
    const int64_t i0 = 5 * b;
    const int cnt = n - i0 < 5 ? static_cast<int>(n - i0) : 5;
    float code[5];
    decode_byte<5>(packed[b], code);
    int64_t s = seg.find(i0);
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      if (k < cnt) {
        const int64_t i = i0 + k;
        s = seg.advance(s, i);
        out[i] = static_cast<scalar_t>(__fmul_rn(code[k], scales[s]));
      }
    }
  }
}

at::Tensor unpack_base3_cuda(const at::Tensor& packed, int64_t numel, const at::Tensor& scales,
                             at::OptionalIntArrayRef segments, at::ScalarType dtype) {
  const auto off = check_unpack_base3_args(packed, numel, scales, segments, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, packed.device(), off_holder);
  const int blocks = gpu::grid_size(base3_bytes(numel), gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_base3", [&] {
    unpack_base3_kernel<scalar_t><<<blocks, gpu::kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), numel, scales.const_data_ptr<float>(), seg,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------- mix_stats

constexpr int kStatsThreads = 256;  // a power of two

struct StatPiece {
  double l1;
  double l2;
  float amax;
  unsigned long long bad;
};

// Reduces v over a block of kN threads in a fixed tree order (results independent of the
// scheduling); every thread gets the result.
template <int kN, typename T, typename Op>
__device__ T block_reduce(T v, T* sh, Op op) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int h = kN / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + h]);
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();
  return r;
}

struct AddD {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxF {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct AddU {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a + b;
  }
};

// Kernel 1, one block per piece (the pieces of csrc/stats.h): table = [begin[P] | len[P]].
__global__ void __launch_bounds__(kStatsThreads)
    mix_piece_kernel(const float* __restrict__ v, const float* __restrict__ hat,
                     const int64_t* __restrict__ table, int64_t npieces,
                     StatPiece* __restrict__ pieces) {
  __shared__ double sh_d[kStatsThreads];
  __shared__ float sh_f[kStatsThreads];
  __shared__ unsigned long long sh_u[kStatsThreads];
  for (int64_t p = blockIdx.x; p < npieces; p += gridDim.x) {  // uniform per block
    const int64_t begin = table[p], len = table[npieces + p];
    double l1 = 0.0, l2 = 0.0;
    float amax = 0.f;
    unsigned long long bad = 0ull;
    for (int64_t i = threadIdx.x; i < len; i += kStatsThreads) {
      const float d = __fsub_rn(v[begin + i], hat[begin + i]);
      if (is_finite_bits(d)) {
        const float a = fabsf(d);
        amax = a > amax ? a : amax;
        const double ad = static_cast<double>(a);
        l1 = __dadd_rn(l1, ad);
        l2 = __dadd_rn(l2, __dmul_rn(ad, ad));  // exact square
      } else {
        ++bad;
      }
    }
    l1 = block_reduce<kStatsThreads>(l1, sh_d, AddD());
    l2 = block_reduce<kStatsThreads>(l2, sh_d, AddD());
    amax = block_reduce<kStatsThreads>(amax, sh_f, MaxF());
    bad = block_reduce<kStatsThreads>(bad, sh_u, AddU());
    if (threadIdx.x == 0) pieces[p] = StatPiece{l1, l2, amax, bad};
  }
}

// Kernel 2, one thread per segment: its pieces in order.
__global__ void mix_merge_kernel(const StatPiece* __restrict__ pieces,
                                 const int64_t* __restrict__ first, int64_t nseg,
                                 float* __restrict__ out) {
  for (int64_t s = grid_start(); s < nseg; s += grid_stride()) {
    double l1 = 0.0, l2 = 0.0;
    float amax = 0.f;
    unsigned long long bad = 0ull;
    for (int64_t p = first[s]; p < first[s + 1]; ++p) {
      const StatPiece q = pieces[p];
      l1 = __dadd_rn(l1, q.l1);
      l2 = __dadd_rn(l2, q.l2);
      amax = q.amax > amax ? q.amax : amax;
      bad += q.bad;
    }
    out[4 * s + 0] = amax;
    out[4 * s + 1] = static_cast<float>(l1);
    out[4 * s + 2] = static_cast<float>(l2);
    out[4 * s + 3] = static_cast<float>(bad);
  }
}

at::Tensor mix_stats_cuda(const at::Tensor& v, const at::Tensor& hat,
                          at::OptionalIntArrayRef segments) {
  const auto off = check_mix_stats_args(v, hat, segments);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  const c10::cuda::CUDAGuard guard(v.device());
  if (v.numel() == 0) return at::zeros({nseg, 4}, v.options());
  const PieceTable pieces_of = stats_pieces(off);
  const int64_t npieces = static_cast<int64_t>(pieces_of.begin.size());  // > 0
  std::vector<int64_t> table;
  table.reserve(2 * npieces + nseg + 1);
  table.insert(table.end(), pieces_of.begin.begin(), pieces_of.begin.end());
  table.insert(table.end(), pieces_of.len.begin(), pieces_of.len.end());
  table.insert(table.end(), pieces_of.first.begin(), pieces_of.first.end());
  const at::Tensor dtable = gpu::cached_device_table(table, v.device());
  const int64_t* ptable = dtable.const_data_ptr<int64_t>();
  at::Tensor pieces = at::empty({npieces * static_cast<int64_t>(sizeof(StatPiece))},
                                v.options().dtype(at::kByte));
  StatPiece* ppieces = reinterpret_cast<StatPiece*>(pieces.mutable_data_ptr<uint8_t>());
  at::Tensor out = at::empty({nseg, 4}, v.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks1 = static_cast<int>(std::min(npieces, gpu::kMaxBlocks));
  mix_piece_kernel<<<blocks1, kStatsThreads, 0, stream>>>(
      v.const_data_ptr<float>(), hat.const_data_ptr<float>(), ptable, npieces, ppieces);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mix_merge_kernel<<<gpu::grid_size(nseg, 128), 128, 0, stream>>>(
      ppieces, ptable + 2 * npieces, nseg, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------- mix_encode

// Byte b: elements K b .. K b + K - 1. d = v - hat; where d is not finite its code is 0 and v
// takes hat (before the update); hat += code * hat_scale; acc += code * acc_scale.
template <int K>
__global__ void mix_encode_kernel(float* __restrict__ v, float* __restrict__ hat,
                                  float* __restrict__ acc, int64_t n,
                                  const float* __restrict__ scales,
                                  const float* __restrict__ hat_scales,
                                  const float* __restrict__ acc_scales, SegTable seg,
                                  uint64_t seed, uint64_t offset, uint8_t* __restrict__ out) {
  const int64_t nbytes = (n + K - 1) / K;
  for (int64_t b = grid_start(); b < nbytes; b += grid_stride()) {
    const int64_t i0 = K * b;
    const int cnt = n - i0 < K ? static_cast<int>(n - i0) : K;
    PhiloxStream rng(seed);
    int64_t s = seg.find(i0);
    int c[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      c[k] = 0;
      if (k < cnt) {
        const int64_t i = i0 + k;
        s = seg.advance(s, i);
        const float h = hat[i];
        float d = __fsub_rn(v[i], h);
        if (!is_finite_bits(d)) {
          d = 0.f;
          v[i] = h;
        }
        c[k] = ternary_code(d, scales[s], rng.draw16(offset + static_cast<uint64_t>(i)));
        const float cf = static_cast<float>(c[k]);
        hat[i] = __fadd_rn(h, __fmul_rn(cf, hat_scales[s]));
        acc[i] = __fadd_rn(acc[i], __fmul_rn(cf, acc_scales[s]));
      }
    }
    out[b] = encode_byte<K>(c);
  }
}

at::Tensor mix_encode_cuda(const at::Tensor& v, const at::Tensor& hat, const at::Tensor& acc,
                           const at::Tensor& scales, const at::Tensor& hat_scales,
                           const at::Tensor& acc_scales, at::OptionalIntArrayRef segments,
                           int64_t seed, int64_t offset, bool base3) {
  const auto off = check_mix_encode_args(v, hat, acc, scales, hat_scales, acc_scales, segments,
                                         seed, offset);
  const int64_t n = v.numel();
  const int64_t nbytes = base3 ? base3_bytes(n) : packed_bytes(n);
  at::Tensor out = at::empty({nbytes}, v.options().dtype(at::kByte));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, v.device(), off_holder);
  const int blocks = gpu::grid_size(nbytes, gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* pv = v.mutable_data_ptr<float>();
  float* ph = hat.mutable_data_ptr<float>();
  float* pa = acc.mutable_data_ptr<float>();
  const float* ps = scales.const_data_ptr<float>();
  const float* phs = hat_scales.const_data_ptr<float>();
  const float* pas = acc_scales.const_data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed), uoffset = static_cast<uint64_t>(offset);
  uint8_t* po = out.mutable_data_ptr<uint8_t>();
  if (base3) {
    mix_encode_kernel<5><<<blocks, gpu::kThreads, 0, stream>>>(pv, ph, pa, n, ps, phs, pas, seg,
                                                               useed, uoffset, po);
  } else {
    mix_encode_kernel<4><<<blocks, gpu::kThreads, 0, stream>>>(pv, ph, pa, n, ps, phs, pas, seg,
                                                               useed, uoffset, po);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------- mix_decode

// The payloads' addresses travel as a kernel argument when there are at most this many (no
// copy, so a call can be captured in a CUDA graph); more go through a device table.
constexpr int kInlinePayloads = 32;
struct Payloads {
  const uint8_t* p[kInlinePayloads];
};

// Byte b: t = ((0 + c_0 s_0) + c_1 s_1) + ... over the payloads in order; acc += t;
// v = v + round(gamma * round(acc - hat)).
template <int K>
__global__ void mix_decode_kernel(float* __restrict__ v, const float* __restrict__ hat,
                                  float* __restrict__ acc, int64_t n, Payloads inline_ptrs,
                                  const int64_t* __restrict__ ptr_table, int64_t rows,
                                  const float* __restrict__ scales, SegTable seg, float gamma) {
  const int64_t nbytes = (n + K - 1) / K;
  for (int64_t b = grid_start(); b < nbytes; b += grid_stride()) {
    const int64_t i0 = K * b;
    const int cnt = n - i0 < K ? static_cast<int>(n - i0) : K;
    int64_t s[K];  // segment of each element (past n: the last segment)
    s[0] = seg.find(i0);
#pragma unroll
    for (int k = 1; k < K; ++k) s[k] = seg.advance(s[k - 1], i0 + k);
    float t[K];
#pragma unroll
    for (int k = 0; k < K; ++k) t[k] = 0.f;
    for (int64_t w = 0; w < rows; ++w) {
      const uint8_t* pw = rows <= kInlinePayloads
                              ? inline_ptrs.p[w]
                              : reinterpret_cast<const uint8_t*>(ptr_table[w]);
      float code[K];
      decode_byte<K>(pw[b], code);
      const float* sw = scales + w * seg.nseg;
#pragma unroll
      for (int k = 0; k < K; ++k) t[k] = __fadd_rn(t[k], __fmul_rn(code[k], sw[s[k]]));
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < cnt) {
        const int64_t i = i0 + k;
        const float a = __fadd_rn(acc[i], t[k]);
        acc[i] = a;
        v[i] = __fadd_rn(v[i], __fmul_rn(gamma, __fsub_rn(a, hat[i])));
      }
    }
  }
}

void mix_decode_cuda(const at::Tensor& v, const at::Tensor& hat, const at::Tensor& acc,
                     at::TensorList packed, const at::Tensor& scales,
                     at::OptionalIntArrayRef segments, double gamma, bool base3) {
  const auto off = check_mix_decode_args(v, hat, acc, packed, scales, segments, base3);
  const int64_t n = v.numel();
  if (n == 0) return;
  const int64_t rows = static_cast<int64_t>(packed.size());
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, v.device(), off_holder);
  Payloads inline_ptrs{};
  at::Tensor table_holder;
  const int64_t* ptr_table = nullptr;
  if (rows <= kInlinePayloads) {
    for (int64_t w = 0; w < rows; ++w) inline_ptrs.p[w] = packed[w].const_data_ptr<uint8_t>();
  } else {
    std::vector<int64_t> ptrs(rows);
    for (int64_t w = 0; w < rows; ++w) {
      const uint8_t* p = packed[w].const_data_ptr<uint8_t>();
      ptrs[w] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p));
    }
    table_holder = gpu::to_device(ptrs, v.device());  // addresses change every call: no cache
    ptr_table = table_holder.const_data_ptr<int64_t>();
  }
  const int64_t nbytes = base3 ? base3_bytes(n) : packed_bytes(n);
  const int blocks = gpu::grid_size(nbytes, gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float g = static_cast<float>(gamma);  // the reference's float32 gamma
  float* pv = v.mutable_data_ptr<float>();
  const float* ph = hat.const_data_ptr<float>();
  float* pa = acc.mutable_data_ptr<float>();
  const float* ps = scales.const_data_ptr<float>();
  if (base3) {
    mix_decode_kernel<5><<<blocks, gpu::kThreads, 0, stream>>>(pv, ph, pa, n, inline_ptrs,
                                                               ptr_table, rows, ps, seg, g);
  } else {
    mix_decode_kernel<4><<<blocks, gpu::kThreads, 0, stream>>>(pv, ph, pa, n, inline_ptrs,
                                                               ptr_table, rows, ps, seg, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- track_prep

// Kernel 1: *ok = false if any g is not finite (ok starts true; every writer writes false).
__global__ void all_finite_kernel(const float* __restrict__ g, int64_t n, bool* __restrict__ ok) {
  bool bad = false;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) bad |= !is_finite_bits(g[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) *ok = false;
}

// Kernel 2: if *ok, y = (y + g) - g_prev and g_prev = g.
__global__ void track_update_kernel(float* __restrict__ y, const float* __restrict__ g,
                                    float* __restrict__ g_prev, int64_t n,
                                    const bool* __restrict__ ok) {
  if (!*ok) return;
  for (int64_t i = grid_start(); i < n; i += grid_stride()) {
    const float gi = g[i];
    y[i] = __fsub_rn(__fadd_rn(y[i], gi), g_prev[i]);
    g_prev[i] = gi;
  }
}

at::Tensor track_prep_cuda(const at::Tensor& y, const at::Tensor& g, const at::Tensor& g_prev) {
  check_track_prep_args(y, g, g_prev);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor ok = at::ones({}, y.options().dtype(at::kBool));  // a fill on the stream, no sync
  const int64_t n = y.numel();
  if (n == 0) return ok;
  const int blocks = gpu::grid_size(n, gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool* pok = ok.mutable_data_ptr<bool>();
  all_finite_kernel<<<blocks, gpu::kThreads, 0, stream>>>(g.const_data_ptr<float>(), n, pok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  track_update_kernel<<<blocks, gpu::kThreads, 0, stream>>>(
      y.mutable_data_ptr<float>(), g.const_data_ptr<float>(), g_prev.mutable_data_ptr<float>(),
      n, pok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CUDA, m) {
  m.impl("ternarize_base3", &ternarize_base3_cuda);
  m.impl("unpack_base3", &unpack_base3_cuda);
  m.impl("mix_stats", &mix_stats_cuda);
  m.impl("mix_encode", &mix_encode_cuda);
  m.impl("mix_decode", &mix_decode_cuda);
  m.impl("track_prep", &track_prep_cuda);
}

}  // namespace commcomp
