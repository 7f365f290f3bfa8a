// CUDA kernels of the ternary codec: ternarize (to 2-bit packed bytes or int8 codes), unpack,
// and the fused multi-rank unpack_accumulate. The bit-level rules are in csrc/ternary.h; the
// results are bit-identical to the CPU kernels (csrc/cpu/ternary.cpp).
//
// Every kernel gives one thread one packed byte, i.e. 4 consecutive elements, in a grid-stride
// loop. Segment offsets stay on the host for the checks and reach the device as a small table
// (none for a single segment); a thread finds the segment of its first element by binary
// search and steps forward for the other three.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../ternary.h"
#include "launch.cuh"

namespace commcomp {
namespace {

using gpu::SegTable;

// Codes of the elements 4b .. 4b + 3 of x (those below n), for every byte b.
// kPack: byte b of `packed` gets the 2-bit codes; else `codes` gets one int8 per element.
// kVec: x is Pack4-aligned, so full groups are read with one vector load.
template <typename scalar_t, bool kVec, bool kPack>
__global__ void ternarize_kernel(const scalar_t* __restrict__ x, int64_t n,
                                 const float* __restrict__ scales, SegTable seg, uint64_t seed,
                                 uint64_t offset, uint8_t* __restrict__ packed,
                                 int8_t* __restrict__ codes) {
  const int64_t nbytes = (n + 3) / 4;  // packed_bytes(n), which is host-only
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    const int64_t i0 = 4 * b;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    float v[4];
    gpu::load4<scalar_t, kVec>(x, i0, cnt, v);
    // The four 16-bit draws come from one Philox call (8 elements share a counter), or from
    // two when the group straddles a multiple of 8 (offset % 4 != 0).
    PhiloxStream rng(seed);
    int64_t s = seg.find(i0);
    uint32_t bits = 0u;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt) {
        const int64_t i = i0 + k;
        s = seg.advance(s, i);
        const int c = ternary_code(v[k], scales[s], rng.draw16(offset + static_cast<uint64_t>(i)));
        // Pack: field k holds encode2(c). Int8: byte k holds c (little-endian word).
        bits |= kPack ? encode2(c) << (2 * k)
                      : static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(c)))
                            << (8 * k);
      }
    }
    if (kPack) {
      packed[b] = static_cast<uint8_t>(bits);  // unused trailing fields stay zero
    } else if (cnt == 4 && (reinterpret_cast<uintptr_t>(codes) & 3u) == 0) {
      // One 4-byte store (codes is a fresh allocation, so aligned in practice; i0 % 4 == 0).
      *reinterpret_cast<uint32_t*>(codes + i0) = bits;
    } else {
      for (int k = 0; k < cnt; ++k) codes[i0 + k] = static_cast<int8_t>(bits >> (8 * k));
    }
  }
}

template <typename scalar_t, bool kPack>
void launch_ternarize(const at::Tensor& x, const at::Tensor& scales, SegTable seg,
                      uint64_t seed, uint64_t offset, const at::Tensor& out) {
  const int64_t n = x.numel();
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const float* ps = scales.const_data_ptr<float>();
  uint8_t* packed = kPack ? out.mutable_data_ptr<uint8_t>() : nullptr;
  int8_t* codes = kPack ? nullptr : out.mutable_data_ptr<int8_t>();
  const int blocks = gpu::grid_size(packed_bytes(n), gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (gpu::pack4_aligned<scalar_t>(px)) {
    ternarize_kernel<scalar_t, true, kPack><<<blocks, gpu::kThreads, 0, stream>>>(
        px, n, ps, seg, seed, offset, packed, codes);
  } else {
    ternarize_kernel<scalar_t, false, kPack><<<blocks, gpu::kThreads, 0, stream>>>(
        px, n, ps, seg, seed, offset, packed, codes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ternarize_cuda(const at::Tensor& x, const at::Tensor& scales,
                          at::OptionalIntArrayRef segments, int64_t seed, int64_t offset,
                          bool pack) {
  const auto off = check_ternarize_args(x, scales, segments, seed, offset);
  const int64_t n = x.numel();
  at::Tensor out = pack ? at::empty({packed_bytes(n)}, x.options().dtype(at::kByte))
                        : at::empty({n}, x.options().dtype(at::kChar));
  if (n == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, x.device(), off_holder);
  const uint64_t useed = static_cast<uint64_t>(seed), uoffset = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ternarize", [&] {
    if (pack) {
      launch_ternarize<scalar_t, true>(x, scales, seg, useed, uoffset, out);
    } else {
      launch_ternarize<scalar_t, false>(x, scales, seg, useed, uoffset, out);
    }
  });
  return out;
}

at::Tensor ternarize_pack_cuda(const at::Tensor& x, const at::Tensor& scales,
                               at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cuda(x, scales, segments, seed, offset, /*pack=*/true);
}

at::Tensor ternarize_int8_cuda(const at::Tensor& x, const at::Tensor& scales,
                               at::OptionalIntArrayRef segments, int64_t seed, int64_t offset) {
  return ternarize_cuda(x, scales, segments, seed, offset, /*pack=*/false);
}

// out[i] = decode(i) * scale(segment of i), one byte (4 elements) per thread.
// kVec: out is Pack4-aligned (always, in practice: it is a fresh allocation).
template <typename scalar_t, bool kVec>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, int64_t n,
                              const float* __restrict__ scales, SegTable seg,
                              scalar_t* __restrict__ out) {
  const int64_t nbytes = (n + 3) / 4;  // packed_bytes(n), which is host-only
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    const int64_t i0 = 4 * b;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    const uint32_t byte = packed[b];
    int64_t s = seg.find(i0);
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      s = seg.advance(s, i0 + k);  // i0 + k may be n: s then stops at the last segment
      v[k] = k < cnt ? __fmul_rn(decode2(byte, k), scales[s]) : 0.f;
    }
    gpu::store4<scalar_t, kVec>(out, i0, cnt, v);
  }
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t numel, const at::Tensor& scales,
                       at::OptionalIntArrayRef segments, at::ScalarType dtype) {
  const auto off = check_unpack_args(packed, numel, scales, segments, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, packed.device(), off_holder);
  const int blocks = gpu::grid_size(packed_bytes(numel), gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack", [&] {
    const uint8_t* pp = packed.const_data_ptr<uint8_t>();
    const float* ps = scales.const_data_ptr<float>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (gpu::pack4_aligned<scalar_t>(po)) {
      unpack_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(pp, numel, ps, seg, po);
    } else {
      unpack_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(pp, numel, ps, seg, po);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out += sum over rows w (in order 0 .. rows - 1) of decode(packed[w]) * scales[w, segment],
// summed in fp32 from 0 and added to out once: the order of the CPU kernel, so the bits match.
// Explicit _rn intrinsics keep nvcc from fusing the multiply-add (the product is exact anyway,
// since the code is -1, 0 or +1, but this makes the rounding plain to see).
template <typename scalar_t, bool kVec>
__global__ void unpack_accumulate_kernel(const uint8_t* __restrict__ packed, int64_t rows,
                                         int64_t n, const float* __restrict__ scales,
                                         SegTable seg, scalar_t* __restrict__ out) {
  const int64_t nbytes = (n + 3) / 4;  // packed_bytes(n), which is host-only
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    const int64_t i0 = 4 * b;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    int64_t s[4];  // segment of each element (fully unrolled: stays in registers)
    s[0] = seg.find(i0);
#pragma unroll
    for (int k = 1; k < 4; ++k) s[k] = seg.advance(s[k - 1], i0 + k);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t w = 0; w < rows; ++w) {
      const uint32_t byte = packed[w * nbytes + b];
      const float* sw = scales + w * seg.nseg;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc[k] = __fadd_rn(acc[k], __fmul_rn(decode2(byte, k), sw[s[k]]));
      }
    }
    float v[4];
    gpu::load4<scalar_t, kVec>(out, i0, cnt, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __fadd_rn(v[k], acc[k]);
    gpu::store4<scalar_t, kVec>(out, i0, cnt, v);
  }
}

void unpack_accumulate_cuda(const at::Tensor& packed, const at::Tensor& scales,
                            at::OptionalIntArrayRef segments, const at::Tensor& out) {
  const auto off = check_unpack_accumulate_args(packed, scales, segments, out);
  const int64_t numel = out.numel(), rows = packed.size(0);
  if (numel == 0 || rows == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor off_holder;
  const SegTable seg = gpu::seg_table(off, out.device(), off_holder);
  const int blocks = gpu::grid_size(packed_bytes(numel), gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ps = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unpack_acc", [&] {
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (gpu::pack4_aligned<scalar_t>(po)) {
      unpack_accumulate_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(
          pp, rows, numel, ps, seg, po);
    } else {
      unpack_accumulate_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(
          pp, rows, numel, ps, seg, po);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CUDA, m) {
  m.impl("ternarize_pack", &ternarize_pack_cuda);
  m.impl("ternarize_int8", &ternarize_int8_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("unpack_accumulate", &unpack_accumulate_cuda);
}

}  // namespace commcomp
