#pragma once
// Mask pasting, one element at a time, shared by the CPU and CUDA kernels, in two conventions: torchvision's
// (below) and the aligned one (further down, "aligned paste").
//
// torchvision.models.detection.roi_heads.paste_masks_in_image:
//   1. expand_masks: the Mh x Mw mask gets a zero border of `padding`, and the box is scaled about its
//      centre by (Mw + 2 * padding) / Mw (Mw = the mask's last dimension, for both axes, as torchvision);
//   2. the expanded float box is truncated to int64 (x0, y0, x1, y1), the resized mask is
//      h = max(y1 - y0 + 1, 1) by w = max(x1 - x0 + 1, 1) (F.interpolate, bilinear, align_corners=False);
//   3. it is written into the image rows [max(y0, 0), min(y1 + 1, H)) and columns [max(x0, 0), min(x1 + 1, W)).
// The resized mask is never materialised: every image pixel computes its source coordinates itself.
//
// Rounding follows torch's CPU kernels bit for bit on CPUs with FMA (the template flag F = true; their kernels
// are compiled with floating-point contraction): the source index is fma(scale, dst + 0.5, -0.5), and the
// blend is one of two fixed fma chains, chosen like upsample_bilinear2d chooses its kernel (outputs with
// h + w <= 128 take the 4-weight kernel, larger ones the separable one). F = false is the same arithmetic
// without fusion (torch's kernels on CPUs without FMA).
#include <cmath>
#include <cstdint>

#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// Truncation toward zero like Tensor.to(torch.int64), saturating (see saturate_coord).
template <class B> MRCNN_HD int64_t paste_coord_to_int(B v) { return static_cast<int64_t>(saturate_coord(v)); }

// torchvision's float(M + 2 * padding) / M, as the box dtype sees it (a Python float multiplied into the
// box tensor is first rounded to the tensor's dtype).
template <class B> MRCNN_HD B paste_box_scale(int64_t mask_w, int64_t padding) {
  return static_cast<B>(static_cast<double>(mask_w + 2 * padding) / static_cast<double>(mask_w));
}

// Where one mask lands in the image.
struct PastePlan {
  int64_t bx0, by0;        // integer top-left corner of the resized mask (may be outside the image)
  int64_t h, w;            // size of the resized mask, >= 1
  int64_t cx0, cx1;        // image columns [cx0, cx1) that receive it (empty when cx0 >= cx1)
  int64_t cy0, cy1;        // image rows [cy0, cy1)
  bool small;              // h + w <= 128: torch's 4-weight kernel, else the separable one
  MRCNN_HD bool empty() const { return cx0 >= cx1 || cy0 >= cy1; }
};

// box: (x1, y1, x2, y2) in the box dtype B; scale from paste_box_scale.
template <class B> MRCNN_HD PastePlan paste_plan(const B* box, B scale, int64_t img_h, int64_t img_w) {
  const B half = B(0.5);
  // expand_boxes, op by op in the box dtype.
  const B w_half = mul_rn(mul_rn(sub_rn(box[2], box[0]), half), scale);
  const B h_half = mul_rn(mul_rn(sub_rn(box[3], box[1]), half), scale);
  const B x_c = mul_rn(add_rn(box[2], box[0]), half);
  const B y_c = mul_rn(add_rn(box[3], box[1]), half);
  const int64_t x0 = paste_coord_to_int(sub_rn(x_c, w_half));
  const int64_t x1 = paste_coord_to_int(add_rn(x_c, w_half));
  const int64_t y0 = paste_coord_to_int(sub_rn(y_c, h_half));
  const int64_t y1 = paste_coord_to_int(add_rn(y_c, h_half));
  PastePlan p;
  p.bx0 = x0;
  p.by0 = y0;
  p.w = x1 - x0 + 1 > 1 ? x1 - x0 + 1 : 1;
  p.h = y1 - y0 + 1 > 1 ? y1 - y0 + 1 : 1;
  p.cx0 = x0 > 0 ? x0 : 0;
  p.cx1 = x1 + 1 < img_w ? x1 + 1 : img_w;
  p.cy0 = y0 > 0 ? y0 : 0;
  p.cy1 = y1 + 1 < img_h ? y1 + 1 : img_h;
  p.small = p.h + p.w <= 128;
  return p;
}

// F.interpolate(align_corners=False) along one axis: scale = in / out in the accumulation type A.
template <class A> MRCNN_HD A interp_scale(int64_t in_size, int64_t out_size) {
  return static_cast<A>(in_size) / static_cast<A>(out_size);
}

// The two source taps of output index `dst` and their weights (l0 for i0, l1 for i1).
template <class A> struct Taps {
  int64_t i0, i1;
  A l0, l1;
};

template <bool F, class A>
MRCNN_HD Taps<A> source_taps(A scale, int64_t dst, int64_t in_size, int64_t out_size) {
  Taps<A> t;
  if (in_size == out_size) {  // torch copies: both taps on the same element
    t.i0 = t.i1 = dst;
    t.l0 = A(1);
    t.l1 = A(0);
    return t;
  }
  A src = mul_add<F>(scale, static_cast<A>(dst) + A(0.5), A(-0.5));
  src = src < A(0) ? A(0) : src;
  // torch floors in float32 (floorf) even for float64: a double just below an integer rounds up to it, and
  // the clamped weight below then puts all of it on that tap.
  int64_t i0 = static_cast<int64_t>(floorf(static_cast<float>(src)));
  i0 = i0 < in_size - 1 ? i0 : in_size - 1;
  A l1 = src - static_cast<A>(i0);
  l1 = l1 < A(0) ? A(0) : (l1 > A(1) ? A(1) : l1);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.l1 = l1;
  t.l0 = A(1) - l1;
  return t;
}

// v_yx: the four taps (row y0/y1, column x0/x1).
template <bool F, class A>
MRCNN_HD A blend_separable(A v00, A v01, A v10, A v11, A wx0, A wx1, A wy0, A wy1) {
  return lerp<F>(lerp<F>(v00, v01, wx0, wx1), lerp<F>(v10, v11, wx0, wx1), wy0, wy1);
}
template <bool F, class A>
MRCNN_HD A blend_small(A v00, A v01, A v10, A v11, A wx0, A wx1, A wy0, A wy1) {
  A w[4];
  bilinear_weights(wy0, wy1, wx0, wx1, w);
  return mul_add<F>(v11, w[3], mul_add<F>(v10, w[2], mul_add<F>(v00, w[0], v01 * w[1])));
}

// Element (i, j) of the mask with its zero border: mask is mh x mw, row-major.
template <class A, class T, class Load>
MRCNN_HD A padded_at(const T* mask, int64_t mh, int64_t mw, int64_t pad, int64_t i, int64_t j, Load load) {
  const int64_t r = i - pad, c = j - pad;
  return (r >= 0 && r < mh && c >= 0 && c < mw) ? load(mask[r * mw + c]) : A(0);
}

// The pasted value at image pixel (y, x): 0 outside the plan's clip rectangle. sy, sx: interp_scale of the
// padded mask size over the plan's h, w. One pixel of the CUDA kernel (the CPU kernels evaluate the same
// expression from per-row and per-column tables).
template <bool F, class A, class T, class Load>
MRCNN_HD A pasted_pixel(const PastePlan& p, const T* mask, int64_t mh, int64_t mw, int64_t pad, A sy, A sx, int64_t y,
                        int64_t x, Load load) {
  if (y < p.cy0 || y >= p.cy1 || x < p.cx0 || x >= p.cx1) return A(0);
  const Taps<A> ty = source_taps<F>(sy, y - p.by0, mh + 2 * pad, p.h);
  const Taps<A> tx = source_taps<F>(sx, x - p.bx0, mw + 2 * pad, p.w);
  const A v00 = padded_at<A>(mask, mh, mw, pad, ty.i0, tx.i0, load);
  const A v01 = padded_at<A>(mask, mh, mw, pad, ty.i0, tx.i1, load);
  const A v10 = padded_at<A>(mask, mh, mw, pad, ty.i1, tx.i0, load);
  const A v11 = padded_at<A>(mask, mh, mw, pad, ty.i1, tx.i1, load);
  return p.small ? blend_small<F>(v00, v01, v10, v11, tx.l0, tx.l1, ty.l0, ty.l1)
                 : blend_separable<F>(v00, v01, v10, v11, tx.l0, tx.l1, ty.l0, ty.l1);
}

// ---- aligned paste (detectron2's convention) ----------------------------------------------------
// The mask M[Mh, Mw] covers the continuous box (x1, y1, x2, y2) (image pixel i covers [i, i + 1), its centre
// is i + 0.5), as RoIAlign(aligned=True) samples it to make the mask targets. Image pixel (y, x) takes the
// bilinear sample of M at
//   u = (x + 0.5 - x1) * Mw / (x2 - x1) - 0.5,   v = (y + 0.5 - y1) * Mh / (y2 - y1) - 0.5
// with zero padding: a tap with index < 0 or >= Mw (Mh) contributes 0, like F.grid_sample(mode="bilinear",
// padding_mode="zeros", align_corners=False) on the box-normalised grid. No border, no box expansion, no integer
// truncation (torchvision's convention above is misaligned with these targets by up to ~1 px). Only pixels with
// -1 < u < Mw and -1 < v < Mh can be non-zero: the plan holds that window, clipped to the image, and every pixel
// outside it is 0. A degenerate box (x2 - x1 <= 0 or y2 - y1 <= 0) pastes nothing.
// Coordinates and weights are computed in double (once per row and column on the CPU, so it costs nothing
// there); the blend in the accumulation type, x first, then y (blend_separable with fused multiply-adds).

// Mapping of one axis: u(i) = (i + 0.5 - start) * scale - 0.5 for image index i.
struct AlignedAxis {
  double start;   // x1 (y1), clamped to +-kCoordLimit
  double scale;   // mask pixels per image pixel, M / (x2 - x1); 0 for a degenerate box
  int64_t size;   // M: Mw (Mh)
};

struct AlignedPlan {
  AlignedAxis x, y;
  int64_t cx0, cx1;  // image columns [cx0, cx1) with -1 < u < Mw, clipped to the image (empty when cx0 >= cx1)
  int64_t cy0, cy1;  // image rows [cy0, cy1) with -1 < v < Mh
  MRCNN_HD bool empty() const { return cx0 >= cx1 || cy0 >= cy1; }
};

MRCNN_HD AlignedAxis aligned_axis(double a, double b, int64_t size) {
  AlignedAxis ax;
  // NaN -> -2^40 (the CPU entry points reject NaN first).
  ax.start = saturate_coord(a);
  const double len = saturate_coord(b) - ax.start;
  const double s = static_cast<double>(size) / len;
  // s - s == 0 rejects the infinite scale of a (subnormal) sliver and the NaN of len == 0.
  ax.scale = (len > 0.0 && s - s == 0.0) ? s : 0.0;
  ax.size = size;
  return ax;
}

// The mask coordinate of image index i. Non-decreasing in i (every rounding step is monotone), which the
// window search relies on.
MRCNN_HD double aligned_coord(const AlignedAxis& a, int64_t i) {
  return fma_rn(static_cast<double>(i) + 0.5 - a.start, a.scale, -0.5);
}

// The first index i in [0, n] with u(i) > bound (strict) or u(i) >= bound; n when there is none.
MRCNN_HD int64_t aligned_first(const AlignedAxis& a, double bound, bool strict, int64_t n) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const double u = aligned_coord(a, mid);
    if (strict ? u > bound : u >= bound)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// box: (x1, y1, x2, y2) of any float type; mh, mw: the mask size.
template <class B>
MRCNN_HD AlignedPlan aligned_plan(const B* box, int64_t mh, int64_t mw, int64_t img_h, int64_t img_w) {
  AlignedPlan p;
  p.x = aligned_axis(static_cast<double>(box[0]), static_cast<double>(box[2]), mw);
  p.y = aligned_axis(static_cast<double>(box[1]), static_cast<double>(box[3]), mh);
  p.cx0 = p.cx1 = p.cy0 = p.cy1 = 0;
  if (p.x.scale > 0.0 && p.y.scale > 0.0) {
    // Searched with the same aligned_coord as the taps, so the window is exactly where a tap is inside.
    p.cx0 = aligned_first(p.x, -1.0, true, img_w);
    p.cx1 = aligned_first(p.x, static_cast<double>(mw), false, img_w);
    p.cy0 = aligned_first(p.y, -1.0, true, img_h);
    p.cy1 = aligned_first(p.y, static_cast<double>(mh), false, img_h);
  }
  return p;
}

// The two taps of image index i: indices clamped into [0, M) and the weight of a tap outside the mask zeroed,
// so that table-driven loops need no branch (the clamped index then repeats the other tap's element). Outside
// the window both weights are 0.
template <class A> MRCNN_HD Taps<A> aligned_taps(const AlignedAxis& a, int64_t i) {
  const double hi = static_cast<double>(a.size);
  double u = aligned_coord(a, i);
  u = u > -1.0 ? (u < hi ? u : hi) : -1.0;  // keeps the integer conversion in range
  const double f0 = floor(u);
  const double f = u - f0;
  const int64_t k = static_cast<int64_t>(f0);  // -1 .. M
  Taps<A> t;
  t.i0 = k < 0 ? 0 : (k < a.size ? k : a.size - 1);
  t.i1 = k + 1 < a.size ? k + 1 : a.size - 1;  // k + 1 >= 0
  t.l0 = (k >= 0 && k < a.size) ? static_cast<A>(1.0 - f) : A(0);
  t.l1 = (k + 1 < a.size) ? static_cast<A>(f) : A(0);
  return t;
}

// The aligned value at image pixel (y, x): 0 outside the plan's window. One pixel of the CUDA kernel (the CPU
// kernels evaluate the same expression from per-row and per-column tables).
template <bool F, class A, class T, class Load>
MRCNN_HD A aligned_pixel(const AlignedPlan& p, const T* mask, int64_t y, int64_t x, Load load) {
  if (y < p.cy0 || y >= p.cy1 || x < p.cx0 || x >= p.cx1) return A(0);
  const Taps<A> ty = aligned_taps<A>(p.y, y);
  const Taps<A> tx = aligned_taps<A>(p.x, x);
  const int64_t mw = p.x.size;
  const A v00 = load(mask[ty.i0 * mw + tx.i0]);
  const A v01 = load(mask[ty.i0 * mw + tx.i1]);
  const A v10 = load(mask[ty.i1 * mw + tx.i0]);
  const A v11 = load(mask[ty.i1 * mw + tx.i1]);
  return blend_separable<F>(v00, v01, v10, v11, tx.l0, tx.l1, ty.l0, ty.l1);
}

// A window of the image (y0, x0, h, w) written row-major (whole images) or column-major (RLE crops): the
// image pixel of line `o` (a row, or a column), element `i`.
MRCNN_HD void window_pixel(const int64_t* win, bool col_major, int64_t o, int64_t i, int64_t& y, int64_t& x) {
  y = win[0] + (col_major ? i : o);
  x = win[1] + (col_major ? o : i);
}

}  // namespace detail
}  // namespace mrcnn
