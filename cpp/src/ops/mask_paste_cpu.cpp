// Mask pasting on the CPU: float and bool images written tile by tile (a tile = a block of rows of one
// mask), and COCO RLE straight from the boxes, evaluating only the pixels inside each box, column by
// column (RLE's order), with the runs outside computed arithmetically. Both conventions of
// detail/mask_paste_math.h (torchvision's, aligned) share the tiling and the RLE; each has its own tables.
//
// The inner loops come in two builds of the same code: with fused multiply-adds (compiled for AVX2+FMA and
// picked at run time when the CPU has them, matching torch's own kernels there bit for bit) and without.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/common/simd.h"
#include "mrcnn/ops/detail/mask_paste_math.h"
#include "mrcnn/ops/mask_paste.h"
#include "mrcnn/ops/rle.h"
#include "rle_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mrcnn {
namespace {

using detail::AlignedPlan;
using detail::PastePlan;
using detail::Taps;

bool cpu_has_fma() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return true;  // other targets (aarch64) always fuse; std::fma is exact everywhere
#endif
}

constexpr int64_t kTileRows = 32;    // rows of one mask per work item of the image pastes
constexpr int64_t kRleStripCols = 64;  // columns evaluated at a time by the RLE path

// One mask's source: Mh x Mw values, its zero border, and the interpolation scales of its plan.
template <class A> struct Source {
  const A* mask;
  int64_t mh, mw, pad, ph, pw;  // ph, pw: padded size
  A sy, sx;
};

template <class A> Source<A> make_source(const A* mask, int64_t mh, int64_t mw, int64_t pad, const PastePlan& p) {
  Source<A> s;
  s.mask = mask;
  s.mh = mh;
  s.mw = mw;
  s.pad = pad;
  s.ph = mh + 2 * pad;
  s.pw = mw + 2 * pad;
  s.sy = detail::interp_scale<A>(s.ph, p.h);
  s.sx = detail::interp_scale<A>(s.pw, p.w);
  return s;
}

// Per-thread scratch, reused across calls.
template <class A> struct Scratch {
  std::vector<A> padded;           // padded source rows r0..r1
  std::vector<int32_t> ix0, ix1;   // x taps of the evaluated columns
  std::vector<A> wx0, wx1;
  std::vector<int32_t> iy0, iy1;   // y taps of the evaluated rows (relative to r0)
  std::vector<A> wy0, wy1;
  std::vector<A> rows;             // separable: x-blended source rows; small: gathered taps
  std::vector<uint8_t> cols;       // RLE: evaluated pixels, column-major
  std::vector<uint64_t> counts;
};
template <class A> Scratch<A>& scratch() {
  thread_local Scratch<A> s;
  return s;
}

// Source rows r0..r1 of the padded mask into s.padded.
template <class A> MRCNN_ALWAYS_INLINE void load_padded_rows(const Source<A>& src, int64_t r0, int64_t r1, Scratch<A>& s) {
  const int64_t n = r1 - r0 + 1, pw = src.pw;
  s.padded.assign(static_cast<size_t>(n * pw), A(0));
  for (int64_t i = r0; i <= r1; ++i) {
    const int64_t r = i - src.pad;
    if (r < 0 || r >= src.mh) continue;
    std::copy(src.mask + r * src.mw, src.mask + (r + 1) * src.mw, s.padded.data() + (i - r0) * pw + src.pad);
  }
}

// The taps of image indices first .. first + n - 1 (tap(i): the two taps of index i) as four tables.
template <class A, class Tap>
MRCNN_ALWAYS_INLINE void fill_taps(int64_t first, int64_t n, Tap tap, std::vector<int32_t>& i0,
                                   std::vector<int32_t>& i1, std::vector<A>& w0, std::vector<A>& w1) {
  i0.resize(n); i1.resize(n); w0.resize(n); w1.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    const Taps<A> t = tap(first + k);
    i0[k] = static_cast<int32_t>(t.i0);
    i1[k] = static_cast<int32_t>(t.i1);
    w0[k] = t.l0;
    w1[k] = t.l1;
  }
}

// Tap tables of columns [xa, xb) (s.ix*, s.wx*) and rows [ya, yb) (s.iy*, s.wy*) from xtap(x) and ytap(y), the two
// taps of an image column or row. The row taps are made relative to r0; [r0, r1] are the source rows read (taps
// are monotone in the image index, so the first and last rows bound them).
template <class A, class XTap, class YTap>
MRCNN_ALWAYS_INLINE void tap_tables(int64_t ya, int64_t yb, int64_t xa, int64_t xb, XTap xtap, YTap ytap, int64_t& r0,
                                    int64_t& r1, Scratch<A>& s) {
  const int64_t bh = yb - ya;
  fill_taps(xa, xb - xa, xtap, s.ix0, s.ix1, s.wx0, s.wx1);
  fill_taps(ya, bh, ytap, s.iy0, s.iy1, s.wy0, s.wy1);
  r0 = s.iy0[0];
  r1 = s.iy1[bh - 1];
  for (int64_t j = 0; j < bh; ++j) {
    s.iy0[j] -= static_cast<int32_t>(r0);
    s.iy1[j] -= static_cast<int32_t>(r0);
  }
}

// torchvision's convention: the taps of the resized (padded) mask.
template <bool F, class A>
MRCNN_ALWAYS_INLINE void compute_taps(const PastePlan& p, const Source<A>& src, int64_t ya, int64_t yb, int64_t xa,
                                      int64_t xb, int64_t& r0, int64_t& r1, Scratch<A>& s) {
  tap_tables(
      ya, yb, xa, xb, [&](int64_t x) { return detail::source_taps<F>(src.sx, x - p.bx0, src.pw, p.w); },
      [&](int64_t y) { return detail::source_taps<F>(src.sy, y - p.by0, src.ph, p.h); }, r0, r1, s);
}

// Per source row: the separable kernel's x-blended row, or (small kernel) the two gathered taps.
template <bool F, class A>
MRCNN_ALWAYS_INLINE void prepare_rows(const PastePlan& p, const Source<A>& src, int64_t nrows, int64_t bw,
                                      Scratch<A>& s) {
  const int32_t* __restrict__ ix0 = s.ix0.data();
  const int32_t* __restrict__ ix1 = s.ix1.data();
  const A* __restrict__ wx0 = s.wx0.data();
  const A* __restrict__ wx1 = s.wx1.data();
  if (!p.small) {
    s.rows.resize(static_cast<size_t>(nrows * bw));
    for (int64_t i = 0; i < nrows; ++i) {
      const A* __restrict__ row = s.padded.data() + i * src.pw;
      A* __restrict__ h = s.rows.data() + i * bw;
      for (int64_t k = 0; k < bw; ++k) h[k] = detail::lerp<F>(row[ix0[k]], row[ix1[k]], wx0[k], wx1[k]);
    }
  } else {
    s.rows.resize(static_cast<size_t>(2 * nrows * bw));
    for (int64_t i = 0; i < nrows; ++i) {
      const A* __restrict__ row = s.padded.data() + i * src.pw;
      A* __restrict__ g0 = s.rows.data() + 2 * i * bw;
      A* __restrict__ g1 = g0 + bw;
      for (int64_t k = 0; k < bw; ++k) {
        g0[k] = row[ix0[k]];
        g1[k] = row[ix1[k]];
      }
    }
  }
}

// Pasted values of image rows [ya, yb) x columns [xa, xb) (inside the plan's clip rectangle), row-major:
// row y goes to out + (y - ya) * ostride, converted by conv.
template <bool F, class A, class O, class Conv>
MRCNN_ALWAYS_INLINE void eval_rows(const PastePlan& p, const Source<A>& src, int64_t ya, int64_t yb, int64_t xa,
                                   int64_t xb, O* out, int64_t ostride, Conv conv, Scratch<A>& s) {
  const int64_t bw = xb - xa;
  int64_t r0, r1;
  compute_taps<F>(p, src, ya, yb, xa, xb, r0, r1, s);
  load_padded_rows(src, r0, r1, s);
  prepare_rows<F>(p, src, r1 - r0 + 1, bw, s);
  const A* __restrict__ wx0 = s.wx0.data();
  const A* __restrict__ wx1 = s.wx1.data();
  for (int64_t j = 0; j < yb - ya; ++j) {
    O* __restrict__ o = out + j * ostride;
    const A l0 = s.wy0[j], l1 = s.wy1[j];
    if (!p.small) {
      const A* __restrict__ h0 = s.rows.data() + s.iy0[j] * bw;
      const A* __restrict__ h1 = s.rows.data() + s.iy1[j] * bw;
      for (int64_t k = 0; k < bw; ++k) o[k] = conv(detail::lerp<F>(h0[k], h1[k], l0, l1));
    } else {
      const A* __restrict__ a = s.rows.data() + 2 * s.iy0[j] * bw;
      const A* __restrict__ b = a + bw;
      const A* __restrict__ c = s.rows.data() + 2 * s.iy1[j] * bw;
      const A* __restrict__ d = c + bw;
      for (int64_t k = 0; k < bw; ++k)
        o[k] = conv(detail::blend_small<F>(a[k], b[k], c[k], d[k], wx0[k], wx1[k], l0, l1));
    }
  }
}

// s.rows (per rows of bw values) transposed into s.padded, so that each column's taps are contiguous
// (column k at k * per); the callers no longer need the padded rows by then.
template <class A>
MRCNN_ALWAYS_INLINE const A* transpose_rows(int64_t per, int64_t bw, Scratch<A>& s) {
  std::vector<A>& t = s.padded;
  t.resize(static_cast<size_t>(bw * per));
  for (int64_t i = 0; i < per; ++i)
    for (int64_t k = 0; k < bw; ++k) t[k * per + i] = s.rows[i * bw + k];
  return t.data();
}

// One transposed column blended along y with the row taps (s.iy0/iy1/wy0/wy1) and thresholded into o[0, ch).
template <bool F, class A>
MRCNN_ALWAYS_INLINE void threshold_column(const A* __restrict__ col, int64_t ch, A thr, uint8_t* __restrict__ o,
                                          const Scratch<A>& s) {
  const int32_t* __restrict__ iy0 = s.iy0.data();
  const int32_t* __restrict__ iy1 = s.iy1.data();
  const A* __restrict__ wy0 = s.wy0.data();
  const A* __restrict__ wy1 = s.wy1.data();
  for (int64_t j = 0; j < ch; ++j) o[j] = detail::lerp<F>(col[iy0[j]], col[iy1[j]], wy0[j], wy1[j]) > thr;
}

// The same values for all clipped rows and columns [xa, xb), thresholded, column-major into s.cols
// (column k at k * (cy1 - cy0)).
template <bool F, class A>
MRCNN_ALWAYS_INLINE void eval_columns(const PastePlan& p, const Source<A>& src, int64_t xa, int64_t xb, A thr,
                                      Scratch<A>& s) {
  const int64_t bw = xb - xa, ch = p.cy1 - p.cy0;
  int64_t r0, r1;
  compute_taps<F>(p, src, p.cy0, p.cy1, xa, xb, r0, r1, s);
  load_padded_rows(src, r0, r1, s);
  const int64_t nrows = r1 - r0 + 1;
  prepare_rows<F>(p, src, nrows, bw, s);
  const int64_t per = p.small ? 2 * nrows : nrows;
  const A* t = transpose_rows(per, bw, s);
  s.cols.resize(static_cast<size_t>(bw * ch));
  for (int64_t k = 0; k < bw; ++k) {
    const A* __restrict__ col = t + k * per;
    uint8_t* __restrict__ o = s.cols.data() + k * ch;
    if (!p.small) {
      threshold_column<F>(col, ch, thr, o, s);
    } else {
      const int32_t* __restrict__ iy0 = s.iy0.data();
      const int32_t* __restrict__ iy1 = s.iy1.data();
      const A wx0 = s.wx0[k], wx1 = s.wx1[k];
      for (int64_t j = 0; j < ch; ++j)
        o[j] = detail::blend_small<F>(col[2 * iy0[j]], col[2 * iy0[j] + 1], col[2 * iy1[j]], col[2 * iy1[j] + 1],
                                      wx0, wx1, s.wy0[j], s.wy1[j]) > thr;
    }
  }
}

// ---- aligned paste: the same, from detail::aligned_taps tables ------------------------------------
// The aligned taps of columns [xa, xb) and rows [ya, yb) (inside the plan's window).
template <class A>
MRCNN_ALWAYS_INLINE void aligned_tables(const AlignedPlan& p, int64_t ya, int64_t yb, int64_t xa, int64_t xb,
                                        int64_t& r0, int64_t& r1, Scratch<A>& s) {
  tap_tables(
      ya, yb, xa, xb, [&](int64_t x) { return detail::aligned_taps<A>(p.x, x); },
      [&](int64_t y) { return detail::aligned_taps<A>(p.y, y); }, r0, r1, s);
}

// Mask rows r0..r1 blended along x into s.rows (row i at i * bw).
template <bool F, class A>
MRCNN_ALWAYS_INLINE void aligned_blend_rows(const A* mask, int64_t mw, int64_t r0, int64_t r1, int64_t bw,
                                            Scratch<A>& s) {
  const int32_t* __restrict__ ix0 = s.ix0.data();
  const int32_t* __restrict__ ix1 = s.ix1.data();
  const A* __restrict__ wx0 = s.wx0.data();
  const A* __restrict__ wx1 = s.wx1.data();
  s.rows.resize(static_cast<size_t>((r1 - r0 + 1) * bw));
  for (int64_t i = 0; i <= r1 - r0; ++i) {
    const A* __restrict__ row = mask + (r0 + i) * mw;
    A* __restrict__ h = s.rows.data() + i * bw;
    for (int64_t k = 0; k < bw; ++k) h[k] = detail::lerp<F>(row[ix0[k]], row[ix1[k]], wx0[k], wx1[k]);
  }
}

// Aligned values of image rows [ya, yb) x columns [xa, xb) (inside the window), row y at out + (y - ya) * ostride.
template <bool F, class A, class O, class Conv>
MRCNN_ALWAYS_INLINE void aligned_eval_rows(const AlignedPlan& p, const A* mask, int64_t ya, int64_t yb, int64_t xa,
                                           int64_t xb, O* out, int64_t ostride, Conv conv, Scratch<A>& s) {
  const int64_t bw = xb - xa;
  int64_t r0, r1;
  aligned_tables(p, ya, yb, xa, xb, r0, r1, s);
  aligned_blend_rows<F>(mask, p.x.size, r0, r1, bw, s);
  for (int64_t j = 0; j < yb - ya; ++j) {
    O* __restrict__ o = out + j * ostride;
    const A l0 = s.wy0[j], l1 = s.wy1[j];
    const A* __restrict__ h0 = s.rows.data() + s.iy0[j] * bw;
    const A* __restrict__ h1 = s.rows.data() + s.iy1[j] * bw;
    for (int64_t k = 0; k < bw; ++k) o[k] = conv(detail::lerp<F>(h0[k], h1[k], l0, l1));
  }
}

// The window's rows at columns [xa, xb), thresholded, column-major into s.cols (column k at k * (cy1 - cy0)).
template <bool F, class A>
MRCNN_ALWAYS_INLINE void aligned_eval_columns(const AlignedPlan& p, const A* mask, int64_t xa, int64_t xb, A thr,
                                              Scratch<A>& s) {
  const int64_t bw = xb - xa, ch = p.cy1 - p.cy0;
  int64_t r0, r1;
  aligned_tables(p, p.cy0, p.cy1, xa, xb, r0, r1, s);
  aligned_blend_rows<F>(mask, p.x.size, r0, r1, bw, s);
  const int64_t nrows = r1 - r0 + 1;
  const A* t = transpose_rows(nrows, bw, s);
  s.cols.resize(static_cast<size_t>(bw * ch));
  for (int64_t k = 0; k < bw; ++k) threshold_column<F>(t + k * nrows, ch, thr, s.cols.data() + k * ch, s);
}

// ---- the image pastes ----------------------------------------------------------------------------
template <class A, class Plan> struct PasteJob {
  const A* masks;
  int64_t mh, mw, pad, H, W, tiles_per_mask;
  const Plan* plans;
};

template <bool F, class A, class Plan, class O, class Conv>
MRCNN_ALWAYS_INLINE void paste_tiles_impl(const PasteJob<A, Plan>& job, O* out, Conv conv, int64_t t0, int64_t t1) {
  Scratch<A>& s = scratch<A>();
  const int64_t H = job.H, W = job.W;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / job.tiles_per_mask;
    const int64_t ya = (t % job.tiles_per_mask) * kTileRows, yb = std::min(ya + kTileRows, H);
    const Plan& p = job.plans[n];
    O* img = out + n * H * W;
    const O zero = conv(A(0));  // outside the box the image is 0, thresholded like the rest
    const int64_t ea = p.empty() ? yb : std::max(ya, p.cy0), eb = p.empty() ? yb : std::min(yb, p.cy1);
    for (int64_t y = ya; y < yb; ++y) {
      O* row = img + y * W;
      if (y < ea || y >= eb) {
        std::fill_n(row, W, zero);
      } else {
        std::fill_n(row, p.cx0, zero);
        std::fill_n(row + p.cx1, W - p.cx1, zero);
      }
    }
    if (ea < eb) {
      const A* mask = job.masks + n * job.mh * job.mw;
      if constexpr (std::is_same_v<Plan, AlignedPlan>) {
        aligned_eval_rows<F>(p, mask, ea, eb, p.cx0, p.cx1, img + ea * W + p.cx0, W, conv, s);
      } else {
        const Source<A> src = make_source(mask, job.mh, job.mw, job.pad, p);
        eval_rows<F>(p, src, ea, eb, p.cx0, p.cx1, img + ea * W + p.cx0, W, conv, s);
      }
    }
  }
}

template <class A, class Plan, class O, class Conv>
MRCNN_X86_FMA_TARGET void paste_tiles_fused(const PasteJob<A, Plan>& job, O* out, Conv conv, int64_t t0,
                                            int64_t t1) {
  paste_tiles_impl<true>(job, out, conv, t0, t1);
}
template <class A, class Plan, class O, class Conv>
void paste_tiles_plain(const PasteJob<A, Plan>& job, O* out, Conv conv, int64_t t0, int64_t t1) {
  paste_tiles_impl<false>(job, out, conv, t0, t1);
}

// One mask's values: its plan and its Mh x Mw elements (pad: torchvision's zero border, unused when aligned).
template <class A> struct MaskRef {
  const A* mask;
  int64_t mh, mw, pad;
};

// One RLE counts string: the box's columns evaluated in strips, everything else as arithmetic zero runs.
template <bool F, class A, class Plan>
MRCNN_ALWAYS_INLINE std::string rle_one_impl(const Plan& p, const MaskRef<A>& m, int64_t H, int64_t W, A thr) {
  Scratch<A>& s = scratch<A>();
  cpu::RunLengths runs(s.counts);
  const uint8_t zero = A(0) > thr;  // the image outside the box, thresholded
  if (!p.empty()) {
    const int64_t ch = p.cy1 - p.cy0;
    runs.add(zero, static_cast<uint64_t>(p.cx0 * H));
    for (int64_t xa = p.cx0; xa < p.cx1; xa += kRleStripCols) {
      const int64_t xb = std::min(xa + kRleStripCols, p.cx1);
      if constexpr (std::is_same_v<Plan, AlignedPlan>) {
        aligned_eval_columns<F>(p, m.mask, xa, xb, thr, s);
      } else {
        eval_columns<F>(p, make_source(m.mask, m.mh, m.mw, m.pad, p), xa, xb, thr, s);
      }
      for (int64_t k = 0; k < xb - xa; ++k) {
        runs.add(zero, static_cast<uint64_t>(p.cy0));
        runs.column(s.cols.data() + k * ch, ch);
        runs.add(zero, static_cast<uint64_t>(H - p.cy1));
      }
    }
    runs.add(zero, static_cast<uint64_t>((W - p.cx1) * H));
  } else {
    runs.add(zero, static_cast<uint64_t>(H * W));
  }
  runs.finish();
  return rle_counts_string(s.counts);
}
template <class A, class Plan>
MRCNN_X86_FMA_TARGET std::string rle_one_fused(const Plan& p, const MaskRef<A>& m, int64_t H, int64_t W, A thr) {
  return rle_one_impl<true>(p, m, H, W, thr);
}
template <class A, class Plan>
std::string rle_one_plain(const Plan& p, const MaskRef<A>& m, int64_t H, int64_t W, A thr) {
  return rle_one_impl<false>(p, m, H, W, thr);
}

// ---- plans ------------------------------------------------------------------------------------
template <class B> void check_finite_boxes(const TensorView& boxes) {
  const B* b = boxes.ptr<B>();
  for (int64_t i = 0; i < boxes.numel(); ++i)
    MRCNN_CHECK_VALUE(std::isfinite(b[i]), "boxes contains NaN or infinite values (box ", i / 4, ")");
}

std::vector<PastePlan> cpu_plans(const TensorView& boxes, int64_t mask_w, int64_t padding, int64_t H, int64_t W) {
  std::vector<PastePlan> plans(static_cast<size_t>(boxes.size(0)));
  auto fill = [&](auto* b) {
    using B = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
    check_finite_boxes<B>(boxes);
    const B scale = detail::paste_box_scale<B>(mask_w, padding);
    for (size_t i = 0; i < plans.size(); ++i) plans[i] = detail::paste_plan(b + 4 * i, scale, H, W);
  };
  if (boxes.dtype == DType::Float32)
    fill(boxes.ptr<const float>());
  else
    fill(boxes.ptr<const double>());
  return plans;
}

std::vector<AlignedPlan> cpu_aligned_plans(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t H,
                                           int64_t W) {
  std::vector<AlignedPlan> plans(static_cast<size_t>(boxes.size(0)));
  auto fill = [&](auto* b) {
    using B = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
    check_finite_boxes<B>(boxes);
    for (size_t i = 0; i < plans.size(); ++i) plans[i] = detail::aligned_plan(b + 4 * i, mask_h, mask_w, H, W);
  };
  if (boxes.dtype == DType::Float32)
    fill(boxes.ptr<const float>());
  else
    fill(boxes.ptr<const double>());
  return plans;
}

// Calls f with the plans of either convention.
template <class Fn>
void with_plans(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding, bool aligned, int64_t H,
                int64_t W, Fn f) {
  if (aligned)
    f(cpu_aligned_plans(boxes, mask_h, mask_w, H, W));
  else
    f(cpu_plans(boxes, mask_w, padding, H, W));
}

// The image outputs are hundreds of MB that we write exactly once, so their cost is mostly first-touch page
// faults: asking for transparent huge pages (Linux, THP in "madvise" mode) makes that 512x fewer faults
// (measured: 426 MB in ~37 ms instead of ~220 ms). Only a hint; the memory and its contents are unchanged.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // failure is harmless
#else
  (void)data;
  (void)bytes;
#endif
}

template <class A, class O, class Conv>
void paste_image_cpu(const TensorView& masks, const TensorView& boxes, O* out, int64_t H, int64_t W, int64_t padding,
                     bool aligned, Conv conv) {
  const int64_t N = masks.size(0);
  with_plans(boxes, masks.size(1), masks.size(2), padding, aligned, H, W, [&](const auto& plans) {
    using Plan = typename std::decay_t<decltype(plans)>::value_type;
    PasteJob<A, Plan> job{masks.ptr<const A>(), masks.size(1), masks.size(2), padding, H, W,
                          (H + kTileRows - 1) / kTileRows, plans.data()};
    advise_huge_pages(out, sizeof(O) * static_cast<size_t>(N * H * W));
    const bool fused = cpu_has_fma();
    parallel_for(0, N * job.tiles_per_mask, 1, [&](int64_t t0, int64_t t1) {
      if (fused)
        paste_tiles_fused(job, out, conv, t0, t1);
      else
        paste_tiles_plain(job, out, conv, t0, t1);
    });
  });
}

template <class T> struct Identity {
  T operator()(T v) const { return v; }
};
template <class A> struct Above {
  A thr;
  uint8_t operator()(A v) const { return v > thr; }
};

}  // namespace

// ---- backends -----------------------------------------------------------------------------------
void paste_masks_cpu(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                     bool aligned) {
  MRCNN_DISPATCH_CPU_FLOAT(masks.dtype, "paste_masks", [&] {
    paste_image_cpu<scalar_t>(masks, boxes, out.ptr<scalar_t>(), out.size(1), out.size(2), padding, aligned,
                              Identity<scalar_t>{});
  });
}

void paste_masks_binary_cpu(const TensorView& masks, const TensorView& boxes, const TensorView& out,
                            int64_t padding, bool aligned, double threshold) {
  MRCNN_DISPATCH_CPU_FLOAT(masks.dtype, "paste_masks_binary", [&] {
    paste_image_cpu<scalar_t>(masks, boxes, out.ptr<uint8_t>(), out.size(1), out.size(2), padding, aligned,
                              Above<scalar_t>{static_cast<scalar_t>(threshold)});
  });
}

std::vector<std::string> paste_masks_rle_cpu(const TensorView& masks, const TensorView& boxes, int64_t img_h,
                                             int64_t img_w, int64_t padding, bool aligned, double threshold) {
  const int64_t N = masks.size(0);
  std::vector<std::string> out(static_cast<size_t>(N));
  const bool fused = cpu_has_fma();
  const int64_t mh = masks.size(1), mw = masks.size(2);
  with_plans(boxes, mh, mw, padding, aligned, img_h, img_w, [&](const auto& plans) {
    MRCNN_DISPATCH_CPU_FLOAT(masks.dtype, "paste_masks_rle", [&] {
      const scalar_t* m = masks.ptr<const scalar_t>();
      const scalar_t thr = static_cast<scalar_t>(threshold);
      parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const MaskRef<scalar_t> ref{m + n * mh * mw, mh, mw, padding};
          out[n] = fused ? rle_one_fused(plans[n], ref, img_h, img_w, thr)
                         : rle_one_plain(plans[n], ref, img_h, img_w, thr);
        }
      });
    });
  });
  return out;
}

int64_t paste_masks_windows_cpu(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding,
                                bool aligned, int64_t img_h, int64_t img_w, const TensorView& windows) {
  int64_t* w = windows.ptr<int64_t>();
  int64_t offset = 0;
  with_plans(boxes, mask_h, mask_w, padding, aligned, img_h, img_w, [&](const auto& plans) {
    for (size_t i = 0; i < plans.size(); ++i) {
      const auto& p = plans[i];
      const bool e = p.empty();
      w[5 * i + 0] = e ? 0 : p.cy0;
      w[5 * i + 1] = e ? 0 : p.cx0;
      w[5 * i + 2] = e ? 0 : p.cy1 - p.cy0;
      w[5 * i + 3] = e ? 0 : p.cx1 - p.cx0;
      w[5 * i + 4] = offset;
      offset += w[5 * i + 2] * w[5 * i + 3];
    }
  });
  return offset;
}

void paste_masks_pixelwise_cpu(const TensorView& masks, const TensorView& boxes, const TensorView* windows,
                               const TensorView& out, int64_t padding, bool aligned, double threshold, bool binary,
                               int64_t img_h, int64_t img_w) {
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  with_plans(boxes, mh, mw, padding, aligned, img_h, img_w, [&](const auto& plans) {
    MRCNN_DISPATCH_CPU_FLOAT(masks.dtype, "paste_masks_pixelwise", [&] {
      using A = scalar_t;
      using Plan = typename std::decay_t<decltype(plans)>::value_type;
      const A thr = static_cast<A>(threshold);
      for (int64_t n = 0; n < N; ++n) {
        const Plan& p = plans[n];
        int64_t win[5] = {0, 0, img_h, img_w, n * img_h * img_w};
        if (windows)
          for (int k = 0; k < 5; ++k) win[k] = windows->ptr<const int64_t>()[5 * n + k];
        const bool col_major = windows != nullptr;
        const int64_t outer = col_major ? win[3] : win[2], inner = col_major ? win[2] : win[3];
        MRCNN_CHECK_VALUE(win[4] >= 0 && win[4] + outer * inner <= out.numel(), "windows row ", n, " is outside out");
        const A* mask = masks.ptr<const A>() + n * mh * mw;
        const auto load = [](A a) { return a; };
        for (int64_t o = 0; o < outer; ++o)
          for (int64_t i = 0; i < inner; ++i) {
            int64_t y, x;
            detail::window_pixel(win, col_major, o, i, y, x);
            A v;
            if constexpr (std::is_same_v<Plan, AlignedPlan>) {
              v = detail::aligned_pixel<true, A>(p, mask, y, x, load);
            } else {
              const A sy = detail::interp_scale<A>(mh + 2 * padding, p.h);
              const A sx = detail::interp_scale<A>(mw + 2 * padding, p.w);
              v = detail::pasted_pixel<true>(p, mask, mh, mw, padding, sy, sx, y, x, load);
            }
            const int64_t at = win[4] + o * inner + i;
            if (binary)
              out.ptr<uint8_t>()[at] = v > thr;
            else
              out.ptr<A>()[at] = v;
          }
      }
    });
  });
}

}  // namespace mrcnn
