// CUDA kernels of the sketch operators: CountSketch and block SRHT, forward and transpose.
// The rules are in csrc/sketch.h. countsketch_transpose and srht give the bytes of the CPU
// kernels; countsketch scatters with atomicAdd, so it agrees with the CPU up to float summation
// order and is not run-to-run deterministic (commcomp.ops.countsketch switches to a
// deterministic path under torch.use_deterministic_algorithms). srht_transpose accumulates
// its colliding rows in a fixed order (index_put_ sorts them): deterministic.
//
// Everything runs on the current stream with no host sync. Element-wise kernels give one
// thread 4 consecutive elements in a grid-stride loop: 4 independent Philox calls keep the
// integer pipes busy, and the data moves as one vector load. The Walsh-Hadamard transform
// works on tiles of kTile elements in shared memory (the stages h < min(block, kTile)); blocks
// larger than kTile finish with one global-memory pass per remaining stage, in stage order.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../sketch.h"
#include "launch.cuh"

namespace commcomp {
namespace {

constexpr int kTile = 4096;  // floats per shared-memory transform tile (16 KiB)

// ------------------------------------------------------------------ CountSketch

// y[h(j)] += sign(j) x[j] (y zeroed by the caller).
template <typename scalar_t, bool kVec>
__global__ void countsketch_kernel(const scalar_t* __restrict__ x, int64_t n, uint32_t s,
                                   uint64_t seed, float* __restrict__ y) {
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t i0 = 4 * g;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    float v[4];
    gpu::load4<scalar_t, kVec>(x, i0, cnt, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt) {
        uint32_t w[4];
        philox4x32_10(static_cast<uint64_t>(i0 + k), seed, w, kTagCountSketch);
        atomicAdd(y + countsketch_bucket(w, s), __fmul_rn(v[k], countsketch_sign(w)));
      }
    }
  }
}

// out[j] = sign(j) y[h(j)].
template <typename scalar_t, bool kVec>
__global__ void countsketch_transpose_kernel(const scalar_t* __restrict__ y, uint32_t s,
                                             int64_t n, uint64_t seed, float* __restrict__ out) {
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t i0 = 4 * g;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = 0.f;
      if (k < cnt) {
        uint32_t w[4];
        philox4x32_10(static_cast<uint64_t>(i0 + k), seed, w, kTagCountSketch);
        v[k] = __fmul_rn(static_cast<float>(y[countsketch_bucket(w, s)]), countsketch_sign(w));
      }
    }
    gpu::store4<float, kVec>(out, i0, cnt, v);
  }
}

at::Tensor countsketch_cuda(const at::Tensor& x, int64_t sketch_size, int64_t seed) {
  check_countsketch_args(x, sketch_size, seed);
  const int64_t n = x.numel();
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({sketch_size}, x.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int blocks = gpu::grid_size((n + 3) / 4, gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "countsketch", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    float* po = out.mutable_data_ptr<float>();
    const uint32_t s = static_cast<uint32_t>(sketch_size);
    const uint64_t useed = static_cast<uint64_t>(seed);
    if (gpu::pack4_aligned<scalar_t>(px)) {
      countsketch_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(px, n, s, useed, po);
    } else {
      countsketch_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(px, n, s, useed, po);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor countsketch_transpose_cuda(const at::Tensor& y, int64_t numel, int64_t seed) {
  check_countsketch_transpose_args(y, numel, seed);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty({numel}, y.options().dtype(at::kFloat));
  if (numel == 0) return out;
  const int blocks = gpu::grid_size((numel + 3) / 4, gpu::kThreads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "countsketch_t", [&] {
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    float* po = out.mutable_data_ptr<float>();
    const uint32_t s = static_cast<uint32_t>(y.numel());
    const uint64_t useed = static_cast<uint64_t>(seed);
    if (gpu::pack4_aligned<float>(po)) {
      countsketch_transpose_kernel<scalar_t, true><<<blocks, gpu::kThreads, 0, stream>>>(
          py, s, numel, useed, po);
    } else {
      countsketch_transpose_kernel<scalar_t, false><<<blocks, gpu::kThreads, 0, stream>>>(
          py, s, numel, useed, po);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------ Walsh-Hadamard

// One CUDA block per tile of kTile elements [base, base + len) of the padded vector (len is a
// multiple of `stages`, the smallest of block and kTile): dst = H_stages(in) where
// in[i] = src[i] (times sign(i) if kSignIn) for i < src_len, else 0; dst[i] is written (times
// sign(i) if kSignOut) for i < dst_len. Stages 1 and 2 run in registers on groups of 4, the
// others in shared memory. src may be dst: a tile is read completely before it is written.
template <typename src_t, bool kSignIn, bool kSignOut>
__global__ void fwht_tile_kernel(const src_t* src, int64_t src_len, float* dst, int64_t dst_len,
                                 int64_t n, int stages, uint64_t seed) {
  __shared__ float sh[kTile];
  const int64_t ntiles = (n + kTile - 1) / kTile;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t base = t * kTile;
    const int len = static_cast<int>(n - base < kTile ? n - base : kTile);
    for (int g = threadIdx.x; 4 * g < len; g += blockDim.x) {
      float v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t i = base + 4 * g + k;
        v[k] = 0.f;  // padding: a plain +0, never multiplied by a sign
        if (i < src_len) {
          v[k] = static_cast<float>(src[i]);
          if (kSignIn) v[k] = __fmul_rn(v[k], srht_sign(static_cast<uint64_t>(i), seed));
        }
      }
      if (stages > 1) {
        butterfly(v[0], v[1]);
        butterfly(v[2], v[3]);
      }
      if (stages > 2) {
        butterfly(v[0], v[2]);
        butterfly(v[1], v[3]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (4 * g + k < len) sh[4 * g + k] = v[k];
      }
    }
    __syncthreads();
    for (int h = 4; h < stages; h *= 2) {
      for (int p = threadIdx.x; p < len / 2; p += blockDim.x) {
        const int i = (p / h) * 2 * h + p % h;
        butterfly(sh[i], sh[i + h]);
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const int64_t j = base + i;
      if (j < dst_len) {
        float r = sh[i];
        if (kSignOut) r = __fmul_rn(r, srht_sign(static_cast<uint64_t>(j), seed));
        dst[j] = r;
      }
    }
    __syncthreads();  // the next tile reuses sh
  }
}

// Stage h (>= kTile) over v[0, n): one butterfly per pair.
__global__ void fwht_stage_kernel(float* v, int64_t n, int64_t h) {
  const int64_t pairs = n / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += stride) {
    const int64_t i = (p / h) * 2 * h + p % h;
    float a = v[i], b = v[i + h];
    butterfly(a, b);
    v[i] = a;
    v[i + h] = b;
  }
}

// The tile stages of the transform of v[0, n) (the input as described at fwht_tile_kernel),
// then the wide stages when block > kTile.
template <typename src_t, bool kSignIn, bool kSignOut>
void launch_fwht(const src_t* src, int64_t src_len, float* dst, int64_t dst_len, int64_t n,
                 int64_t block, uint64_t seed, cudaStream_t stream) {
  const int stages = static_cast<int>(block < kTile ? block : kTile);
  const int tiles = static_cast<int>(std::min<int64_t>((n + kTile - 1) / kTile, gpu::kMaxBlocks));
  fwht_tile_kernel<src_t, kSignIn, kSignOut>
      <<<tiles, gpu::kThreads, 0, stream>>>(src, src_len, dst, dst_len, n, stages, seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t h = kTile; h < block; h *= 2) {
    fwht_stage_kernel<<<gpu::grid_size(n / 2, gpu::kThreads), gpu::kThreads, 0, stream>>>(dst, n, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------ SRHT

// y[k] = v[row(k)] * scale.
__global__ void srht_gather_kernel(const float* __restrict__ v, uint32_t n, uint32_t s,
                                   float scale, uint64_t seed, float* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < s;
       k += stride) {
    y[k] = __fmul_rn(v[srht_row(static_cast<uint64_t>(k), seed, n, s)], scale);
  }
}

// rows[k] = row(k), vals[k] = y[k] * scale: the terms of v[row(k)] += y[k] * scale.
template <typename scalar_t>
__global__ void srht_terms_kernel(const scalar_t* __restrict__ y, uint32_t n, uint32_t s,
                                  float scale, uint64_t seed, int64_t* __restrict__ rows,
                                  float* __restrict__ vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < s;
       k += stride) {
    rows[k] = static_cast<int64_t>(srht_row(static_cast<uint64_t>(k), seed, n, s));
    vals[k] = __fmul_rn(static_cast<float>(y[k]), scale);
  }
}

// out[j] = v[j] * sign(j) for j < numel.
__global__ void srht_sign_kernel(const float* __restrict__ v, int64_t numel, uint64_t seed,
                                 float* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < numel;
       j += stride) {
    out[j] = __fmul_rn(v[j], srht_sign(static_cast<uint64_t>(j), seed));
  }
}

at::Tensor srht_cuda(const at::Tensor& x, int64_t sketch_size, int64_t block, int64_t seed) {
  const int64_t n = check_srht_args(x, sketch_size, block, seed);
  const int64_t numel = x.numel(), s = sketch_size;
  const c10::cuda::CUDAGuard guard(x.device());
  if (numel == 0) return at::zeros({s}, x.options().dtype(at::kFloat));
  const float scale = srht_scale(n, s, block);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor v = at::empty({n}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({s}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "srht", [&] {
    launch_fwht<scalar_t, true, false>(x.const_data_ptr<scalar_t>(), numel,
                                       v.mutable_data_ptr<float>(), n, n, block, useed, stream);
  });
  srht_gather_kernel<<<gpu::grid_size(s, gpu::kThreads), gpu::kThreads, 0, stream>>>(
      v.const_data_ptr<float>(), static_cast<uint32_t>(n), static_cast<uint32_t>(s), scale,
      useed, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor srht_transpose_cuda(const at::Tensor& y, int64_t numel, int64_t block, int64_t seed) {
  const int64_t n = check_srht_transpose_args(y, numel, block, seed);
  const int64_t s = y.numel();
  const c10::cuda::CUDAGuard guard(y.device());
  if (numel == 0) return at::empty({0}, y.options().dtype(at::kFloat));
  const float scale = srht_scale(n, s, block);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor v = at::zeros({n}, y.options().dtype(at::kFloat));
  at::Tensor out = at::empty({numel}, v.options());
  // Rows drawn with replacement collide; three or more atomicAdds into one row would sum in a
  // run-dependent order, and DDP replicas de-sketching the same all-reduced sketch would drift
  // apart. index_put_ with accumulate sorts the indices (stably) on CUDA, so the sum order is
  // fixed: the result is run-to-run deterministic.
  at::Tensor rows = at::empty({s}, y.options().dtype(at::kLong));
  at::Tensor vals = at::empty({s}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "srht_t", [&] {
    srht_terms_kernel<scalar_t><<<gpu::grid_size(s, gpu::kThreads), gpu::kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), static_cast<uint32_t>(n), static_cast<uint32_t>(s), scale,
        useed, rows.mutable_data_ptr<int64_t>(), vals.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  c10::List<std::optional<at::Tensor>> index;
  index.push_back(rows);
  v.index_put_(index, vals, /*accumulate=*/true);
  float* pv = v.mutable_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  if (block <= kTile) {  // signs applied as the tiles are written out
    launch_fwht<float, false, true>(pv, n, po, numel, n, block, useed, stream);
  } else {  // in place, then the signs after the wide stages
    launch_fwht<float, false, false>(pv, n, pv, n, n, block, useed, stream);
    srht_sign_kernel<<<gpu::grid_size(numel, gpu::kThreads), gpu::kThreads, 0, stream>>>(
        pv, numel, useed, po);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CUDA, m) {
  m.impl("countsketch", &countsketch_cuda);
  m.impl("countsketch_transpose", &countsketch_transpose_cuda);
  m.impl("srht", &srht_cuda);
  m.impl("srht_transpose", &srht_transpose_cuda);
}

}  // namespace commcomp
