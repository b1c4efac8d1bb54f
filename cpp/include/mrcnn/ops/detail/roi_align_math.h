#pragma once
// RoIAlign / RoIWarp per-element math shared by the CPU and CUDA kernels: bin geometry, sample
// positions, the bilinear rule and FPN level assignment. Semantics are torchvision's roi_align
// (csrc/ops/cpu/roi_align_kernel.cpp) and LevelMapper (ops/poolers.py); T is the accumulation type
// (float for float16/bfloat16/float32 features, double for float64).
#include <stdint.h>

#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// Cap on the adaptive sampling grid (samples per bin and axis). Only absurd boxes (millions of pixels
// on the feature map) reach it; it keeps the sample count and the float index arithmetic bounded.
constexpr int kMaxRoiGrid = 1 << 20;

template <class T> struct RoiBins {
  T start_y, start_x;  // top-left corner of the RoI on the feature grid
  T bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;  // samples per bin along each axis (0: the bin has no samples)
  T count;             // divisor of the average: max(grid_h * grid_w, 1)
};

// Geometry of one RoI (x1, y1, x2, y2 in image coordinates).
//   aligned:  RoIAlign v2, a half-pixel offset so that a box's corners fall on pixel centres.
//   quantize: RoIWarp, corners rounded to the feature grid (aligned is ignored), sizes forced >= 1.
// Not aligned, RoI width/height are forced >= 1 (legacy torchvision behaviour).
template <class T>
MRCNN_HD RoiBins<T> roi_bins(T x1, T y1, T x2, T y2, T scale, int pooled_h, int pooled_w, int sampling_ratio,
                             bool aligned, bool quantize) {
  RoiBins<T> b;
  T ex, ey;
  if (quantize) {
    b.start_x = round_t(x1 * scale);
    b.start_y = round_t(y1 * scale);
    ex = round_t(x2 * scale);
    ey = round_t(y2 * scale);
  } else {
    const T offset = aligned ? T(0.5) : T(0);
    b.start_x = x1 * scale - offset;
    b.start_y = y1 * scale - offset;
    ex = x2 * scale - offset;
    ey = y2 * scale - offset;
  }
  T rw = ex - b.start_x, rh = ey - b.start_y;
  if (!aligned || quantize) {
    rw = rw > T(1) ? rw : T(1);
    rh = rh > T(1) ? rh : T(1);
  }
  b.bin_h = rh / T(pooled_h);
  b.bin_w = rw / T(pooled_w);
  if (sampling_ratio > 0) {
    b.grid_h = b.grid_w = sampling_ratio < kMaxRoiGrid ? sampling_ratio : kMaxRoiGrid;
  } else {
    // ceil(roi size / output size); a negative size (aligned, x2 < x1) gives an empty grid.
    const T gh = ceil_t(b.bin_h), gw = ceil_t(b.bin_w);
    b.grid_h = gh <= T(0) ? 0 : (gh >= T(kMaxRoiGrid) ? kMaxRoiGrid : int(gh));
    b.grid_w = gw <= T(0) ? 0 : (gw >= T(kMaxRoiGrid) ? kMaxRoiGrid : int(gw));
  }
  const int64_t n = int64_t(b.grid_h) * b.grid_w;
  b.count = T(n > 1 ? n : 1);
  return b;
}

// Position of sample i of bin p along one axis (torchvision's expression, same rounding).
template <class T> MRCNN_HD T sample_pos(T start, T bin, int p, int i, int grid) {
  return start + T(p) * bin + T(float(i) + 0.5f) * bin / T(grid);
}

// Candidate samples [i0, i1) of bin p whose position may lie in the valid range [-1, size]. Positions
// are monotone in i, so the valid samples form an interval; this solves for it in floating point and
// widens it by 2 on each side, and callers still test every candidate exactly with bilinear_at(). It
// keeps huge RoIs (adaptive grids of thousands of samples, mostly off the map) cheap.
template <class T> MRCNN_HD void sample_range(T start, T bin, int p, int grid, int64_t size, int& i0, int& i1) {
  i0 = i1 = 0;
  if (grid <= 0 || size <= 0) return;
  const T base = start + T(p) * bin;
  const T step = bin / T(grid);
  if (!(step > T(0) || step < T(0))) {  // zero-size bin: every sample sits at `base`
    i1 = grid;
    return;
  }
  T a = (T(-1) - base) / step - T(0.5), b = (T(size) - base) / step - T(0.5);
  if (a > b) {
    const T t = a;
    a = b;
    b = t;
  }
  a = floor_t(a) - T(2);
  b = ceil_t(b) + T(3);  // exclusive end
  a = a < T(0) ? T(0) : (a > T(grid) ? T(grid) : a);
  b = b < T(0) ? T(0) : (b > T(grid) ? T(grid) : b);
  i0 = int(a);
  i1 = int(b);
}

// One axis of a bilinear sample: neighbours lo/hi and their weights.
template <class T> struct Lerp {
  int lo, hi;
  T wlo, whi;
};

// torchvision's bilinear rule along one axis: a sample outside [-1, size] contributes nothing (false);
// negative positions clamp to 0; at the last pixel both neighbours are size - 1.
template <class T> MRCNN_HD bool bilinear_at(T v, int64_t size, Lerp<T>& o) {
  if (size <= 0 || v < T(-1) || v > T(size)) return false;
  if (v <= T(0)) v = T(0);
  int lo = int(v), hi;
  if (lo >= size - 1) {
    lo = hi = int(size - 1);
    v = T(lo);
  } else {
    hi = lo + 1;
  }
  const T l = v - T(lo);
  o.lo = lo;
  o.hi = hi;
  o.whi = l;
  o.wlo = T(1) - l;
  return true;
}

// A sample's value from its four neighbours v_{y x}: (lo, lo), (lo, hi), (hi, lo), (hi, hi), each blend with two
// roundings as in torchvision's CPU kernel. Rows first: the CPU kernels blend whole rows once and reuse them
// across the x samples.
template <class T>
MRCNN_HD T sample_value(const Lerp<T>& y, const Lerp<T>& x, T v_ll, T v_lh, T v_hl, T v_hh) {
  return lerp<false>(lerp<false>(v_ll, v_hl, y.wlo, y.whi), lerp<false>(v_lh, v_hh, y.wlo, y.whi), x.wlo, x.whi);
}

// Gradient weights of a sample's four neighbours, in sample_value()'s order.
template <class T> MRCNN_HD void corner_weights(const Lerp<T>& y, const Lerp<T>& x, T w[4]) {
  bilinear_weights(y.wlo, y.whi, x.wlo, x.whi, w);
}

// "RoIAlign max": a bin whose grid has samples off the map counts them as value 0 (as the average
// does). Valid samples win ties, so the output is 0 and no gradient flows only when every valid
// sample is < 0 (or there is none).
template <class T> MRCNN_HD bool max_bin_takes_sample(bool found, T best, bool has_invalid) {
  return found && !(has_invalid && best < T(0));
}

// FPN level (0-based, relative to k_min) of a box, as torchvision's LevelMapper:
// floor(k0 + log2(sqrt(area) / s0) + 1e-6) clamped to [k_min, k_max], area without +1, computed in T;
// detectron2 (assign_boxes_to_levels): floor(k0 + log2(sqrt(area) / s0 + 1e-8)), the eps inside the log.
// Zero area goes to k_min (log2(0) = -inf); negative area (x2 < x1 xor y2 < y1), for which
// torchvision's cast of NaN is undefined (detectron2 pools nothing for it), also goes to k_min.
template <class T>
MRCNN_HD int fpn_level(T x1, T y1, T x2, T y2, int k_min, int k_max, int canonical_level, T canonical_scale,
                       bool detectron2 = false) {
  const T area = (x2 - x1) * (y2 - y1);
  T v = T(k_min);
  if (area > T(0)) {
    if (detectron2) {
      v = floor_t(T(canonical_level) + log2_t(sqrt_t(area) / canonical_scale + T(1e-8)));
    } else {
      v = T(canonical_level) + log2_t(sqrt_t(area) / canonical_scale);
      v = floor_t(v + T(1e-6));
    }
  }
  v = v < T(k_min) ? T(k_min) : v;  // torch.clamp(min, max): max wins if min > max
  v = v > T(k_max) ? T(k_max) : v;
  return int(v) - k_min;
}

// Batch index of a RoI: must be an integer in [0, n_images).
template <class T> MRCNN_HD bool roi_batch_index(T v, int64_t n_images, int64_t& n) {
  if (!(v >= T(0) && v < T(n_images)) || floor_t(v) != v) return false;
  n = int64_t(v);
  return true;
}

}  // namespace detail
}  // namespace mrcnn
