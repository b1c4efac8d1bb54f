#pragma once
// RoIPool geometry shared by the CPU and CUDA kernels, with torchvision.ops.roi_pool's conventions:
//   * RoI corners are scaled by spatial_scale and rounded half away from zero (std::round);
//   * the RoI spans end - start + 1 cells per axis, at least 1 (malformed RoIs become 1x1);
//   * bin p of `bins` covers [floor(p * len / bins), ceil((p + 1) * len / bins)) cells from the start,
//     computed in the scalar type T as torchvision does, then clamped to the feature map;
//   * an empty bin pools to 0 with arg-max -1.
// Everything after the rounding is int64 and the rounded corners saturate at +-2^40, so no input (NaN,
// inf, 1e30) reaches an overflowing float-to-int cast; below 2^31 (where torchvision's int math is
// defined) the results are identical to torchvision's.
#include <stdint.h>

#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {
namespace roipool {

// round(v) as an int64, saturated to +-2^40; NaN maps to -2^40 (an empty RoI far off the map).
template <class T> MRCNN_HD int64_t round_coord(T v) { return static_cast<int64_t>(saturate_coord(round_t(v))); }

// torchvision truncates the batch index to int; we additionally mark anything outside [0, batch_size)
// (and NaN) as -1, which the kernels treat as "pool nothing" instead of reading out of bounds.
template <class T> MRCNN_HD int64_t batch_index(T v, int64_t batch_size) {
  return (v >= T(0) && v < static_cast<T>(batch_size)) ? static_cast<int64_t>(v) : int64_t(-1);
}

// One RoI in feature-map cells: start corner and extent (>= 1) per axis, and its batch index (-1: invalid).
struct Box {
  int64_t batch, x0, y0, w, h;
};

// roi: (batch_index, x1, y1, x2, y2) already converted to the math type T.
template <class T> MRCNN_HD Box make_box(T b, T x1, T y1, T x2, T y2, T spatial_scale, int64_t batch_size) {
  Box r;
  r.batch = batch_index(b, batch_size);
  r.x0 = round_coord(x1 * spatial_scale);
  r.y0 = round_coord(y1 * spatial_scale);
  const int64_t x1i = round_coord(x2 * spatial_scale);
  const int64_t y1i = round_coord(y2 * spatial_scale);
  r.w = x1i - r.x0 + 1 > 1 ? x1i - r.x0 + 1 : 1;
  r.h = y1i - r.y0 + 1 > 1 ? y1i - r.y0 + 1 : 1;
  return r;
}

// Cells [lo, hi) of bin p (of `bins`) along an axis of `size` cells, for a RoI starting at `start` and
// spanning `len` cells. hi <= lo means the bin is empty.
template <class T>
MRCNN_HD void bin_range(int64_t p, int64_t bins, int64_t start, int64_t len, int64_t size, int64_t& lo,
                        int64_t& hi) {
  const T bin = static_cast<T>(len) / static_cast<T>(bins);
  lo = clamp<int64_t>(static_cast<int64_t>(floor_t(static_cast<T>(p) * bin)) + start, 0, size);
  hi = clamp<int64_t>(static_cast<int64_t>(ceil_t(static_cast<T>(p + 1) * bin)) + start, 0, size);
}

}  // namespace roipool
}  // namespace detail
}  // namespace mrcnn
