#pragma once
// Device pieces shared by nms.cu and proposals.cu: workspace carving, the IoU bitmask kernel and the
// on-device greedy reduction. Both kernels work on S independent segments of candidates that are
// already sorted by descending score, so one launch serves plain NMS (S = 1) and the per-image,
// per-level NMS of the proposal generator (S = images x levels).
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>

#include "launch.cuh"
#include "mrcnn/ops/detail/box_math.h"
#include "mrcnn/ops/detail/nms_math.h"

namespace mrcnn {
namespace cuda {

constexpr int kMaskBits = 64;  // candidates per bitmask word (and per mask-kernel block)
// The reduction keeps one bit per candidate of a segment in shared memory (48 KiB without opt-in).
constexpr int64_t kMaxSegmentBoxes = int64_t(48 * 1024 / 8) * kMaskBits;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t mask_words(int64_t n) { return (n + kMaskBits - 1) / kMaskBits; }

// Bump allocator over the caller's workspace. With base == nullptr it only adds up the sizes, so
// the same code computes the workspace size and carves it.
struct Carver {
  char* base = nullptr;
  int64_t used = 0;
  template <class T> T* take(int64_t count) {
    used = (used + 255) / 256 * 256;
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += count * static_cast<int64_t>(sizeof(T));
    return p;
  }
};

// Bytes of cub temp storage for a stable ascending pair sort of n (K, uint32) elements on the key
// bits [0, end_bit).
template <class K> int64_t sort_temp_bytes(int64_t n, int end_bit = 8 * sizeof(K)) {
  size_t bytes = 0;
  MRCNN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const K*>(nullptr),
                                                   static_cast<K*>(nullptr), static_cast<const uint32_t*>(nullptr),
                                                   static_cast<uint32_t*>(nullptr), static_cast<int>(n), 0,
                                                   end_bit));
  return static_cast<int64_t>(bytes);
}

template <class K>
void sort_pairs(void* temp, int64_t temp_bytes, const K* keys_in, K* keys_out, const uint32_t* vals_in,
                uint32_t* vals_out, int64_t n, int end_bit, cudaStream_t stream) {
  size_t bytes = static_cast<size_t>(temp_bytes);
  MRCNN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, vals_in, vals_out,
                                                   static_cast<int>(n), 0, end_bit, stream));
}

inline int bits_for(int64_t count) {  // bits needed for the values 0 .. count - 1 (at least 1)
  int b = 1;
  while ((int64_t(1) << b) < count) ++b;
  return b;
}

// mask[(seg * stride + i) * words + w] bit b: candidate w * 64 + b (> i) overlaps candidate i with
// IoU > thr (and has its class, if cls is given). Only words w >= i / 64 are written (and read).
// Grid (words, words, segments), kMaskBits threads.
template <class A>
__global__ void nms_mask_kernel(const A* __restrict__ boxes, const int64_t* __restrict__ cls, int64_t stride,
                                int64_t n, int words, A thr, uint64_t* __restrict__ mask) {
  const int rb = blockIdx.y, cb = blockIdx.x;
  if (cb < rb) return;
  const int64_t seg = blockIdx.z;
  const int row_n = static_cast<int>(min64(kMaskBits, n - int64_t(rb) * kMaskBits));
  const int col_n = static_cast<int>(min64(kMaskBits, n - int64_t(cb) * kMaskBits));
  __shared__ A sb[kMaskBits][5];
  __shared__ int64_t sc[kMaskBits];
  const int t = threadIdx.x;
  const A* sboxes = boxes + seg * stride * 4;
  if (t < col_n) {
    const A* b = sboxes + (int64_t(cb) * kMaskBits + t) * 4;
    for (int c = 0; c < 4; ++c) sb[t][c] = b[c];
    sb[t][4] = detail::box_area(b[0], b[1], b[2], b[3]);
    if (cls) sc[t] = cls[seg * stride + int64_t(cb) * kMaskBits + t];
  }
  __syncthreads();
  if (t >= row_n) return;
  const int64_t i = int64_t(rb) * kMaskBits + t;
  const A* a = sboxes + i * 4;
  const A ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
  const A aa = detail::box_area(ax1, ay1, ax2, ay2);
  const int64_t ci = cls ? cls[seg * stride + i] : 0;
  uint64_t bits = 0;
  for (int j = (rb == cb ? t + 1 : 0); j < col_n; ++j) {
    const A iou = detail::box_iou_parts(ax1, ay1, ax2, ay2, aa, sb[j][0], sb[j][1], sb[j][2], sb[j][3], sb[j][4]);
    const bool same = cls ? sc[j] == ci : true;
    if (iou > thr && same) bits |= uint64_t(1) << j;
  }
  mask[(seg * stride + i) * words + cb] = bits;
}

constexpr int kReduceThreads = 256;

// Greedy pass over the bitmask of one segment per block: a candidate is kept unless a kept one (or
// `valid` == 0) removed it. Writes the kept positions (segment-relative, ascending = by score) to
// kept[seg * cap ...] and their number (<= cap) to kept_count[seg].
// Warp 0 resolves the 64 candidates of a word sequentially (their in-word mask rows sit in registers
// and travel by shuffle), then the whole block ORs the kept rows into the later words: one block
// barrier per 64 candidates instead of one per kept box. Dynamic shared memory: words * 8 bytes.
// kThreads: the block size (a template, which also gives the kernel vague linkage in this header).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) nms_reduce_kernel(const uint64_t* __restrict__ mask, int64_t stride, int64_t n, int words,
                                  const uint8_t* __restrict__ valid, int64_t cap, int32_t* __restrict__ kept,
                                  int64_t* __restrict__ kept_count) {
  extern __shared__ uint64_t removed[];
  __shared__ uint64_t s_kept;
  const int64_t seg = blockIdx.x;
  const uint64_t* smask = mask + seg * stride * words;
  for (int w = threadIdx.x; w < words; w += kThreads) {
    uint64_t bits = 0;
    for (int b = 0; b < kMaskBits; ++b) {
      const int64_t j = int64_t(w) * kMaskBits + b;
      const bool gone = j >= n || (valid && !valid[seg * stride + j]);
      bits |= uint64_t(gone) << b;
    }
    removed[w] = bits;
  }
  __syncthreads();
  int64_t nkeep = 0;  // identical in every thread
  for (int b = 0; b < words && nkeep < cap; ++b) {
    const int64_t base = int64_t(b) * kMaskBits;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const int rows = static_cast<int>(min64(kMaskBits, n - base));
      const uint64_t d0 = lane < rows ? smask[(base + lane) * words + b] : 0;
      const uint64_t d1 = lane + 32 < rows ? smask[(base + lane + 32) * words + b] : 0;
      uint64_t cur = removed[b], kept_bits = 0;
      int64_t k = nkeep;
      for (int bit = 0; bit < rows; ++bit) {
        const uint64_t row = __shfl_sync(0xffffffffu, bit < 32 ? d0 : d1, bit & 31);
        if (!((cur >> bit) & 1) && k < cap) {
          kept_bits |= uint64_t(1) << bit;
          cur |= row;
          if (lane == 0) kept[seg * cap + k] = static_cast<int32_t>(base + bit);
          ++k;
        }
      }
      if (lane == 0) s_kept = kept_bits;
    }
    __syncthreads();
    const uint64_t kb = s_kept;
    nkeep += __popcll(kb);
    if (kb) {
      for (int w = b + 1 + threadIdx.x; w < words; w += kThreads) {
        uint64_t acc = 0, m = kb;
        while (m) {
          const int bit = __ffsll(static_cast<long long>(m)) - 1;
          m &= m - 1;
          acc |= smask[(base + bit) * words + w];
        }
        removed[w] |= acc;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) kept_count[seg] = nkeep;
}

inline void launch_nms_segments(const void* boxes_acc, bool is_double, const int64_t* cls, int64_t segments,
                                int64_t stride, int64_t n, double thr, const uint8_t* valid, int64_t cap,
                                uint64_t* mask, int32_t* kept, int64_t* kept_count, cudaStream_t stream) {
  const int words = static_cast<int>(mask_words(n));
  const dim3 grid(words, words, static_cast<unsigned>(segments));
  if (is_double) {
    nms_mask_kernel<double><<<grid, kMaskBits, 0, stream>>>(static_cast<const double*>(boxes_acc), cls, stride, n,
                                                            words, detail::threshold_below(thr, 0.0), mask);
  } else {
    nms_mask_kernel<float><<<grid, kMaskBits, 0, stream>>>(static_cast<const float*>(boxes_acc), cls, stride, n,
                                                           words, detail::threshold_below(thr, 0.0f), mask);
  }
  MRCNN_CUDA_CHECK_LAUNCH();
  nms_reduce_kernel<kReduceThreads><<<static_cast<unsigned>(segments), kReduceThreads, words * sizeof(uint64_t), stream>>>(
      mask, stride, n, words, valid, cap, kept, kept_count);
  MRCNN_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace mrcnn
