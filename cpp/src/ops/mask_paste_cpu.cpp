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
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/detail/mask_paste_math.h"
#include "mrcnn/ops/mask_paste.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MRCNN_X86_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define MRCNN_X86_FMA_TARGET
#endif
#if defined(__GNUC__)
#define MRCNN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MRCNN_ALWAYS_INLINE inline
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

// x taps of columns [xa, xb) and y taps of rows [ya, yb); returns the source row range via r0/r1.
template <bool F, class A>
MRCNN_ALWAYS_INLINE void compute_taps(const PastePlan& p, const Source<A>& src, int64_t ya, int64_t yb, int64_t xa,
                                      int64_t xb, int64_t& r0, int64_t& r1, Scratch<A>& s) {
  const int64_t bw = xb - xa, bh = yb - ya;
  s.ix0.resize(bw); s.ix1.resize(bw); s.wx0.resize(bw); s.wx1.resize(bw);
  for (int64_t k = 0; k < bw; ++k) {
    const Taps<A> t = detail::source_taps<F>(src.sx, xa + k - p.bx0, src.pw, p.w);
    s.ix0[k] = static_cast<int32_t>(t.i0);
    s.ix1[k] = static_cast<int32_t>(t.i1);
    s.wx0[k] = t.l0;
    s.wx1[k] = t.l1;
  }
  s.iy0.resize(bh); s.iy1.resize(bh); s.wy0.resize(bh); s.wy1.resize(bh);
  for (int64_t j = 0; j < bh; ++j) {
    const Taps<A> t = detail::source_taps<F>(src.sy, ya + j - p.by0, src.ph, p.h);
    s.iy0[j] = static_cast<int32_t>(t.i0);
    s.iy1[j] = static_cast<int32_t>(t.i1);
    s.wy0[j] = t.l0;
    s.wy1[j] = t.l1;
  }
  // Taps are monotone in the output index, so the first and last rows bound the source rows used.
  r0 = s.iy0[0];
  r1 = s.iy1[bh - 1];
  for (int64_t j = 0; j < bh; ++j) {
    s.iy0[j] -= static_cast<int32_t>(r0);
    s.iy1[j] -= static_cast<int32_t>(r0);
  }
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
// x taps of columns [xa, xb) and y taps of rows [ya, yb) (inside the plan's window); r0/r1: the mask rows read.
template <class A>
MRCNN_ALWAYS_INLINE void aligned_tables(const AlignedPlan& p, int64_t ya, int64_t yb, int64_t xa, int64_t xb,
                                        int64_t& r0, int64_t& r1, Scratch<A>& s) {
  const int64_t bw = xb - xa, bh = yb - ya;
  s.ix0.resize(bw); s.ix1.resize(bw); s.wx0.resize(bw); s.wx1.resize(bw);
  for (int64_t k = 0; k < bw; ++k) {
    const Taps<A> t = detail::aligned_taps<A>(p.x, xa + k);
    s.ix0[k] = static_cast<int32_t>(t.i0);
    s.ix1[k] = static_cast<int32_t>(t.i1);
    s.wx0[k] = t.l0;
    s.wx1[k] = t.l1;
  }
  s.iy0.resize(bh); s.iy1.resize(bh); s.wy0.resize(bh); s.wy1.resize(bh);
  for (int64_t j = 0; j < bh; ++j) {
    const Taps<A> t = detail::aligned_taps<A>(p.y, ya + j);
    s.iy0[j] = static_cast<int32_t>(t.i0);
    s.iy1[j] = static_cast<int32_t>(t.i1);
    s.wy0[j] = t.l0;
    s.wy1[j] = t.l1;
  }
  r0 = s.iy0[0];  // the clamped taps are monotone too
  r1 = s.iy1[bh - 1];
  for (int64_t j = 0; j < bh; ++j) {
    s.iy0[j] -= static_cast<int32_t>(r0);
    s.iy1[j] -= static_cast<int32_t>(r0);
  }
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

// ---- run lengths ---------------------------------------------------------------------------------
struct Runs {
  std::vector<uint64_t>* counts;
  uint64_t run = 0;
  uint8_t cur = 0;
  explicit Runs(std::vector<uint64_t>& c) : counts(&c) { c.clear(); }
  // n pixels of value bit (0 or 1).
  void add(uint8_t bit, uint64_t n) {
    if (n == 0) return;
    if (bit != cur) {
      counts->push_back(run);
      run = 0;
      cur = bit;
    }
    run += n;
  }
  // A column of 0/1 bytes.
  void column(const uint8_t* c, int64_t n) {
    int64_t i = 0;
    while (i < n) {
      const uint64_t pattern = cur ? 0x0101010101010101ull : 0;
      int64_t j = i;
      for (; j + 8 <= n; j += 8) {
        uint64_t w;
        std::memcpy(&w, c + j, 8);
        if (w != pattern) break;
      }
      while (j < n && c[j] == cur) ++j;
      run += static_cast<uint64_t>(j - i);
      i = j;
      if (i < n) {
        counts->push_back(run);
        run = 0;
        cur ^= 1;
      }
    }
  }
  void finish() { counts->push_back(run); }
};

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
  Runs runs(s.counts);
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

// ---- shared checks and plans ---------------------------------------------------------------------
void check_masks_boxes(const TensorView& masks, const TensorView& boxes, int64_t padding) {
  check_ndim(masks, 3, "masks");
  check_float(masks, "masks");
  check_contiguous(masks, "masks");
  MRCNN_CHECK_VALUE(masks.size(1) > 0 && masks.size(2) > 0, "masks must have non-empty spatial dims, got ",
                    masks.shape_str());
  MRCNN_CHECK_VALUE(padding >= 0, "padding must be >= 0, got ", padding);
  MRCNN_CHECK_VALUE(masks.size(1) + 2 * padding < (int64_t(1) << 30) && masks.size(2) + 2 * padding < (int64_t(1) << 30),
                    "masks are too large (", masks.shape_str(), ", padding ", padding, ")");
  check_ndim(boxes, 2, "boxes");
  MRCNN_CHECK_VALUE(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.shape_str());
  MRCNN_CHECK_TYPE(boxes.dtype == DType::Float32 || boxes.dtype == DType::Float64,
                   "boxes must be float32 or float64, got ", dtype_name(boxes.dtype));
  check_contiguous(boxes, "boxes");
  check_same_device(masks, boxes, "masks", "boxes");
  MRCNN_CHECK_VALUE(boxes.size(0) == masks.size(0), "boxes and masks must have the same length, got ",
                    boxes.size(0), " boxes and ", masks.size(0), " masks");
}

void check_out(const TensorView& out, const TensorView& masks, DType dtype, const char* what) {
  check_ndim(out, 3, "out");
  check_dtype(out, dtype, "out");
  check_same_device(masks, out, "masks", "out");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.size(0) == masks.size(0), "out must have shape [N, H, W] with N = ", masks.size(0),
                    ", got ", out.shape_str(), " (", what, ")");
}

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

// ---- entry points --------------------------------------------------------------------------------
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

void paste_masks(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                 bool aligned, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  check_out(out, masks, masks.dtype, "paste_masks");
  if (out.numel() == 0) return;
  if (masks.is_cuda()) {
    MRCNN_IF_CUDA(paste_masks_cuda(masks, boxes, out, padding, aligned, stream));
  } else {
    paste_masks_cpu(masks, boxes, out, padding, aligned);
  }
}

void paste_masks_binary(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                        bool aligned, double threshold, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  check_out(out, masks, DType::Bool, "paste_masks_binary");
  if (out.numel() == 0) return;
  if (masks.is_cuda()) {
    MRCNN_IF_CUDA(paste_masks_binary_cuda(masks, boxes, out, padding, aligned, threshold, stream));
  } else {
    paste_masks_binary_cpu(masks, boxes, out, padding, aligned, threshold);
  }
}

std::vector<std::string> paste_masks_rle(const TensorView& masks, const TensorView& boxes, int64_t img_h,
                                         int64_t img_w, int64_t padding, bool aligned, double threshold) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(!masks.is_cuda(), "paste_masks_rle takes CPU tensors (CUDA: paste_masks_crops + rle_from_crops)");
  MRCNN_CHECK_VALUE(img_h > 0 && img_w > 0, "img_shape must be positive, got (", img_h, ", ", img_w, ")");
  const int64_t N = masks.size(0);
  std::vector<std::string> out(static_cast<size_t>(N));
  if (N == 0) return out;
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

int64_t paste_masks_windows(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding, bool aligned,
                            int64_t img_h, int64_t img_w, const TensorView& windows) {
  check_ndim(boxes, 2, "boxes");
  MRCNN_CHECK_VALUE(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.shape_str());
  MRCNN_CHECK_TYPE(boxes.dtype == DType::Float32 || boxes.dtype == DType::Float64,
                   "boxes must be float32 or float64, got ", dtype_name(boxes.dtype));
  MRCNN_CHECK_VALUE(!boxes.is_cuda() && !windows.is_cuda(), "paste_masks_windows takes CPU tensors");
  check_contiguous(boxes, "boxes");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(0) == boxes.size(0) && windows.size(1) == 5,
                    "windows must have shape [N, 5], got ", windows.shape_str());
  MRCNN_CHECK_VALUE(mask_h > 0 && mask_w > 0 && padding >= 0 && img_h > 0 && img_w > 0,
                    "bad mask size, padding or image size");
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

void paste_masks_crops(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                       const TensorView& crops, int64_t padding, bool aligned, double threshold, int64_t img_h,
                       int64_t img_w, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(masks.is_cuda(), "paste_masks_crops takes CUDA tensors (CPU: paste_masks_rle)");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  check_same_device(masks, windows, "masks", "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(0) == masks.size(0) && windows.size(1) == 5,
                    "windows must have shape [N, 5], got ", windows.shape_str());
  check_ndim(crops, 1, "crops");
  check_dtype(crops, DType::Bool, "crops");
  check_same_device(masks, crops, "masks", "crops");
  if (masks.size(0) == 0 || crops.numel() == 0) return;
  MRCNN_IF_CUDA(
      paste_masks_crops_cuda(masks, boxes, windows, crops, padding, aligned, threshold, img_h, img_w, stream));
}

void paste_masks_pixelwise(const TensorView& masks, const TensorView& boxes, const TensorView* windows,
                           const TensorView& out, int64_t padding, bool aligned, double threshold, bool binary,
                           int64_t img_h, int64_t img_w) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(!masks.is_cuda() && !out.is_cuda(), "paste_masks_pixelwise takes CPU tensors");
  MRCNN_CHECK_VALUE(img_h > 0 && img_w > 0, "img_shape must be positive");
  check_contiguous(out, "out");
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  if (windows) {
    check_dtype(*windows, DType::Int64, "windows");
    check_contiguous(*windows, "windows");
    MRCNN_CHECK_VALUE(windows->ndim == 2 && windows->size(0) == N && windows->size(1) == 5,
                      "windows must have shape [N, 5]");
    MRCNN_CHECK_VALUE(binary && out.dtype == DType::Bool && out.ndim == 1, "crops must be a 1-D bool tensor");
  } else {
    check_out(out, masks, binary ? DType::Bool : masks.dtype, "paste_masks_pixelwise");
    MRCNN_CHECK_VALUE(out.size(1) == img_h && out.size(2) == img_w, "out must have shape [N, img_h, img_w]");
  }
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

std::vector<std::string> rle_from_crops(const TensorView& crops, const TensorView& windows, int64_t img_h,
                                        int64_t img_w, bool outside) {
  MRCNN_CHECK_VALUE(!crops.is_cuda() && !windows.is_cuda(), "rle_from_crops takes CPU tensors");
  check_ndim(crops, 1, "crops");
  check_dtype(crops, DType::Bool, "crops");
  check_contiguous(crops, "crops");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(1) == 5, "windows must have shape [N, 5], got ",
                    windows.shape_str());
  const int64_t N = windows.size(0);
  const int64_t* w = windows.ptr<const int64_t>();
  const uint8_t* c = crops.ptr<const uint8_t>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y0 = w[5 * i], x0 = w[5 * i + 1], h = w[5 * i + 2], wd = w[5 * i + 3], off = w[5 * i + 4];
    MRCNN_CHECK_VALUE(h >= 0 && wd >= 0 && y0 >= 0 && x0 >= 0 && y0 + h <= img_h && x0 + wd <= img_w && off >= 0 &&
                          off + h * wd <= crops.numel(),
                      "windows row ", i, " is outside the image or the crops");
  }
  std::vector<std::string> out(static_cast<size_t>(N));
  parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> counts;
    for (int64_t i = b; i < e; ++i) {
      const int64_t y0 = w[5 * i], x0 = w[5 * i + 1], h = w[5 * i + 2], wd = w[5 * i + 3], off = w[5 * i + 4];
      Runs runs(counts);
      const uint8_t z = outside ? 1 : 0;
      if (h > 0 && wd > 0) {
        runs.add(z, static_cast<uint64_t>(x0 * img_h));
        for (int64_t k = 0; k < wd; ++k) {  // crops are column-major: RLE order
          runs.add(z, static_cast<uint64_t>(y0));
          runs.column(c + off + k * h, h);
          runs.add(z, static_cast<uint64_t>(img_h - y0 - h));
        }
        runs.add(z, static_cast<uint64_t>((img_w - x0 - wd) * img_h));
      } else {
        runs.add(z, static_cast<uint64_t>(img_h * img_w));
      }
      runs.finish();
      out[i] = rle_counts_string(counts);
    }
  });
  return out;
}

std::vector<std::string> rle_encode(const TensorView& masks) {
  check_ndim(masks, 3, "masks");
  MRCNN_CHECK_TYPE(masks.dtype == DType::Bool || masks.dtype == DType::UInt8, "masks must be bool or uint8, got ",
                   dtype_name(masks.dtype));
  MRCNN_CHECK_VALUE(!masks.is_cuda(), "rle_encode takes CPU tensors");
  check_contiguous(masks, "masks");
  const int64_t N = masks.size(0), H = masks.size(1), W = masks.size(2);
  std::vector<std::string> out(static_cast<size_t>(N));
  const uint8_t* base = masks.ptr<const uint8_t>();
  parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> colany(static_cast<size_t>(W)), col(static_cast<size_t>(H));
    std::vector<uint64_t> counts;
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* m = base + n * H * W;
      // Bounding rows and columns of the set pixels: one pass over the mask, 8 bytes at a time; only that
      // box is then scanned column by column.
      std::fill(colany.begin(), colany.end(), uint8_t(0));
      int64_t ry0 = H, ry1 = -1;
      const int64_t W8 = W / 8;
      for (int64_t y = 0; y < H; ++y) {
        const uint8_t* __restrict__ row = m + y * W;
        uint8_t* __restrict__ acc = colany.data();
        uint64_t any = 0;
        for (int64_t i = 0; i < W8; ++i) {
          uint64_t v, a;
          std::memcpy(&v, row + 8 * i, 8);
          std::memcpy(&a, acc + 8 * i, 8);
          a |= v;
          any |= v;
          std::memcpy(acc + 8 * i, &a, 8);
        }
        for (int64_t x = 8 * W8; x < W; ++x) {
          acc[x] |= row[x];
          any |= row[x];
        }
        if (any) {
          ry0 = std::min(ry0, y);
          ry1 = y;
        }
      }
      Runs runs(counts);
      if (ry1 < 0) {
        runs.add(0, static_cast<uint64_t>(H * W));
      } else {
        int64_t rx0 = 0, rx1 = W - 1;
        while (!colany[rx0]) ++rx0;
        while (!colany[rx1]) --rx1;
        const int64_t ch = ry1 - ry0 + 1;
        runs.add(0, static_cast<uint64_t>(rx0 * H));
        for (int64_t x = rx0; x <= rx1; ++x) {
          for (int64_t y = 0; y < ch; ++y) col[y] = m[(ry0 + y) * W + x] != 0;
          runs.add(0, static_cast<uint64_t>(ry0));
          runs.column(col.data(), ch);
          runs.add(0, static_cast<uint64_t>(H - 1 - ry1));
        }
        runs.add(0, static_cast<uint64_t>((W - 1 - rx1) * H));
      }
      runs.finish();
      out[n] = rle_counts_string(counts);
    }
  });
  return out;
}

std::string rle_counts_string(const std::vector<uint64_t>& counts) {
  std::string s;
  s.reserve(counts.size() * 2 + 4);
  for (size_t i = 0; i < counts.size(); ++i) {
    long long x = static_cast<long long>(counts[i]);
    if (i > 2) x -= static_cast<long long>(counts[i - 2]);
    detail::rle_put_count(x, [&](char c) { s.push_back(c); });
  }
  return s;
}

}  // namespace mrcnn
