// Helpers shared by the CUDA kernels (csrc/cuda/*.cu only): launch geometry, the segment
// table on the device, and 4-wide vector loads and stores.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace commcomp {
namespace gpu {

constexpr int kThreads = 256;       // threads per block of the element-wise kernels
constexpr int64_t kMaxBlocks = 65535;  // grid cap; the kernels loop grid-stride past it

// Blocks for `work` items at `threads` per block (work > 0), capped at kMaxBlocks.
inline int grid_size(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, kMaxBlocks));
}

// Copies a small host table to `device` without blocking the host: it is staged in pinned
// memory and copied on the current stream. The caching host allocator records the copy on
// that stream, so the pinned block is not reused before the copy has run.
inline at::Tensor to_device(const std::vector<int64_t>& table, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(table.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(table.begin(), table.end(), host.mutable_data_ptr<int64_t>());
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

// The device copy of a small host table, cached by (device, contents): a model's buckets
// reuse the same few segment layouts every step, so after the first call no copy is made,
// and calls inside a CUDA graph capture (after a warm-up call) capture no host memory.
// The cache is deliberately leaked: destroying CUDA tensors at exit can outlive the driver.
inline at::Tensor cached_device_table(const std::vector<int64_t>& table,
                                      const at::Device& device) {
  using Key = std::pair<int, std::vector<int64_t>>;
  static std::mutex* mu = new std::mutex();
  static std::map<Key, at::Tensor>* cache = new std::map<Key, at::Tensor>();
  std::lock_guard<std::mutex> lock(*mu);
  Key key{device.index(), table};
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  if (cache->size() >= 1024) cache->clear();  // bound the memory for unusual workloads
  at::Tensor t = to_device(table, device);
  cache->emplace(std::move(key), t);
  return t;
}

// Segment offsets [0, ..., n] on the device. With one segment there is no table (off is
// null) and every element is in segment 0.
struct SegTable {
  const int64_t* off;  // nseg + 1 offsets, or nullptr when nseg == 1
  int64_t nseg;

  // Segment of element i: the last s in [0, nseg - 1] with off[s] <= i. Taking the last one
  // skips empty segments (equal offsets), like std::upper_bound - 1 on the CPU.
  __device__ __forceinline__ int64_t find(int64_t i) const {
    int64_t lo = 0, hi = nseg - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (off[mid] <= i) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }

  // Segment of element i >= off[s], given the segment s of an earlier element.
  __device__ __forceinline__ int64_t advance(int64_t s, int64_t i) const {
    while (s + 1 < nseg && i >= off[s + 1]) ++s;
    return s;
  }
};

// Host side: the table of `off` (from segment_offsets) on `device`, kept alive by `holder`.
inline SegTable seg_table(const std::vector<int64_t>& off, const at::Device& device,
                          at::Tensor& holder) {
  const int64_t nseg = static_cast<int64_t>(off.size()) - 1;
  if (nseg == 1) return SegTable{nullptr, 1};
  holder = cached_device_table(off, device);
  return SegTable{holder.const_data_ptr<int64_t>(), nseg};
}

// Four consecutive elements as one aligned unit: 16 bytes for float, 8 for half/bfloat16.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Pack4 {
  scalar_t v[4];
};

// True when p can be read or written as Pack4 at every multiple of 4 elements.
template <typename scalar_t>
bool pack4_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<scalar_t>) == 0;
}

// x[i0, i0 + cnt) as float (cnt in 1..4, zeros past cnt). One vector load when kVec (the
// base is Pack4-aligned, checked on the host) and the group is full.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ x, int64_t i0, int cnt,
                                      float v[4]) {
  if (kVec && cnt == 4) {
    const Pack4<scalar_t> p = *reinterpret_cast<const Pack4<scalar_t>*>(x + i0);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = static_cast<float>(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < cnt ? static_cast<float>(x[i0 + k]) : 0.f;
  }
}

// y[i0, i0 + cnt) = v converted to scalar_t; the store counterpart of load4.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void store4(scalar_t* __restrict__ y, int64_t i0, int cnt,
                                       const float v[4]) {
  if (kVec && cnt == 4) {
    Pack4<scalar_t> p;
#pragma unroll
    for (int k = 0; k < 4; ++k) p.v[k] = static_cast<scalar_t>(v[k]);
    *reinterpret_cast<Pack4<scalar_t>*>(y + i0) = p;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < cnt) y[i0 + k] = static_cast<scalar_t>(v[k]);
    }
  }
}

}  // namespace gpu
}  // namespace commcomp
