// CUDA kernel of segment_stats: per-segment max |x| (NaN-propagating) and population std.
//
// Deterministic, with no atomics, in two kernels over the same pieces as the CPU kernel (each
// segment cut into runs of at most kStatsPiece elements):
//   1. one block per piece: float64 sum -> mean, then the float64 sum of (x - mean)^2, each
//      reduced over the block in a fixed tree order; writes the piece's Moments;
//   2. one block per segment: each thread merges a strided subset of the segment's pieces in
//      order, then a fixed-order tree merge (Chan et al., merge_moments) gives the segment.
// The merge order differs from the CPU's sequential one, so the last bits may differ.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../stats.h"
#include "launch.cuh"

namespace commcomp {
namespace {

constexpr int kStatsThreads = 256;  // kernel 1 block size (a power of two)
constexpr int kMergeThreads = 128;  // kernel 2 block size (a power of two)

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct NanMaxOp {
  __device__ float operator()(float a, float b) const { return nan_max(a, b); }
};
struct MergeOp {
  __device__ Moments operator()(const Moments& a, const Moments& b) const {
    return merge_moments(a, b);
  }
};

// Reduces v over a block of kN threads (a power of two) in a fixed tree order, so the result
// does not depend on scheduling. Every thread gets the result; sh holds kN values.
template <int kN, typename T, typename Op>
__device__ T block_reduce(T v, T* sh, Op op) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int h = kN / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) sh[threadIdx.x] = op(sh[threadIdx.x], sh[threadIdx.x + h]);
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();  // everyone has read sh[0] before the caller reuses sh
  return r;
}

// Kernel 1. table = [piece_begin[P] | piece_len[P] | ...]; every piece has 1..kStatsPiece
// elements. Two passes over the piece (the second mostly from L2) give an accurate m2.
template <typename scalar_t>
__global__ void __launch_bounds__(kStatsThreads)
    piece_moments_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ table,
                         int64_t npieces, Moments* __restrict__ pieces) {
  __shared__ double sh_sum[kStatsThreads];
  __shared__ float sh_max[kStatsThreads];
  // The loop bound is the same for the whole block, so the __syncthreads inside are safe.
  for (int64_t p = blockIdx.x; p < npieces; p += gridDim.x) {
    const scalar_t* xp = x + table[p];
    const int64_t len = table[npieces + p];
    double sum = 0.0;
    float amax = 0.f;
    for (int64_t i = threadIdx.x; i < len; i += kStatsThreads) {
      const float v = static_cast<float>(xp[i]);
      sum += static_cast<double>(v);
      amax = nan_max(amax, fabsf(v));
    }
    sum = block_reduce<kStatsThreads>(sum, sh_sum, SumOp());
    amax = block_reduce<kStatsThreads>(amax, sh_max, NanMaxOp());
    const double mean = len > 0 ? sum / static_cast<double>(len) : 0.0;
    double m2 = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += kStatsThreads) {
      const double d = static_cast<double>(static_cast<float>(xp[i])) - mean;
      m2 += d * d;
    }
    m2 = block_reduce<kStatsThreads>(m2, sh_sum, SumOp());
    // m2 is a sum of squares (>= 0, or NaN when the piece has NaN/Inf, which std keeps).
    if (threadIdx.x == 0) pieces[p] = Moments{static_cast<double>(len), mean, m2, amax};
  }
}

// Kernel 2. Segment s owns pieces first_piece[s] .. first_piece[s + 1] - 1 (none if empty:
// then the merge of nothing gives count 0, absmax 0 and std 0).
__global__ void __launch_bounds__(kMergeThreads)
    merge_pieces_kernel(const Moments* __restrict__ pieces, const int64_t* __restrict__ first_piece,
                        int64_t nseg, float* __restrict__ absmax, float* __restrict__ stdev) {
  __shared__ Moments sh[kMergeThreads];
  for (int64_t s = blockIdx.x; s < nseg; s += gridDim.x) {
    Moments m{0.0, 0.0, 0.0, 0.f};
    for (int64_t p = first_piece[s] + threadIdx.x; p < first_piece[s + 1]; p += kMergeThreads) {
      m = merge_moments(m, pieces[p]);
    }
    m = block_reduce<kMergeThreads>(m, sh, MergeOp());
    if (threadIdx.x == 0) {
      absmax[s] = m.absmax;
      stdev[s] = moments_std(m);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> segment_stats_cuda(const at::Tensor& x,
                                                      at::OptionalIntArrayRef segments) {
  check_float_input(x, "x");
  const int64_t n = x.numel();
  const auto off = segment_offsets(segments, n);
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fopts = x.options().dtype(at::kFloat);
  if (n == 0) return {at::zeros({nseg}, fopts), at::zeros({nseg}, fopts)};  // no pieces
  // Pieces as on the CPU, in one table: [piece_begin[P] | piece_len[P] | first_piece[S + 1]].
  const PieceTable pieces_of = stats_pieces(off);
  const int64_t npieces = static_cast<int64_t>(pieces_of.begin.size());  // > 0 since n > 0
  std::vector<int64_t> table;
  table.reserve(2 * npieces + nseg + 1);
  table.insert(table.end(), pieces_of.begin.begin(), pieces_of.begin.end());
  table.insert(table.end(), pieces_of.len.begin(), pieces_of.len.end());
  table.insert(table.end(), pieces_of.first.begin(), pieces_of.first.end());
  const at::Tensor dtable = gpu::cached_device_table(table, x.device());
  const int64_t* ptable = dtable.const_data_ptr<int64_t>();
  // Per-piece Moments in a raw device buffer (the caching allocator aligns it for doubles).
  at::Tensor pieces = at::empty({npieces * static_cast<int64_t>(sizeof(Moments))},
                                x.options().dtype(at::kByte));
  Moments* ppieces = reinterpret_cast<Moments*>(pieces.mutable_data_ptr<uint8_t>());
  at::Tensor absmax = at::empty({nseg}, fopts);
  at::Tensor stdev = at::empty({nseg}, fopts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int blocks1 = static_cast<int>(std::min(npieces, gpu::kMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segstats", [&] {
    piece_moments_kernel<scalar_t><<<blocks1, kStatsThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), ptable, npieces, ppieces);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int blocks2 = static_cast<int>(std::min(nseg, gpu::kMaxBlocks));
  merge_pieces_kernel<<<blocks2, kMergeThreads, 0, stream>>>(
      ppieces, ptable + 2 * npieces, nseg, absmax.mutable_data_ptr<float>(),
      stdev.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {absmax, stdev};
}

}  // namespace

TORCH_LIBRARY_IMPL(commcomp, CUDA, m) { m.impl("segment_stats", &segment_stats_cuda); }

}  // namespace commcomp
