// RoIAlign / RoIWarp / multi-level RoIAlign on the CPU.
//
// Bilinear sampling is separable: a sample's y neighbours, weights and validity depend only on its
// (ph, iy) and the x ones only on (pw, ix). A per-RoI plan lists the valid y samples of every output
// row and the valid x samples of every output column, once for all channels. The kernels then blend
// the two rows of each y sample over the columns the RoI uses (contiguous, vectorised) and blend that
// along x, instead of gathering four pixels per sample and channel.
//
// NCHW features: one task per (channel, level, image) plane, which stays in L2 while every RoI of that
// image is pooled from it (pooling RoI by RoI streams all C planes per RoI from DRAM). Backward: the
// task also owns the gradient plane, zero-fills it and adds its RoIs in index order, so there are no
// write conflicts and the result is bitwise independent of the thread count.
// Channels-last features: forward is parallel over RoIs with the channel vector innermost; backward is
// parallel over channel blocks, each owning its channels of every gradient pixel.
// Both layouts evaluate the same expressions in the same order per element, so they agree bitwise.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/detail/roi_align_math.h"
#include "mrcnn/ops/roi_align.h"

namespace mrcnn {
namespace {

using detail::Lerp;

// ---- per-RoI sampling plans ----------------------------------------------------------------------

constexpr int64_t kSpanFactor = 4;

template <class T> struct Plans {
  struct Roi {
    int64_t n = 0;
    int level = -1;  // -1: not pooled, output 0 (level index outside the given features)
    int gh = 0, gw = 0;
    T count = 1;
    int64_t ycap = 0, xcap = 0;  // capacity (candidate samples) before the exact test
    int64_t ys = 0, xs = 0;      // first entry in ys / xs
    int64_t col = 0;             // first entry in cols (sparse RoIs)
    int ncols = 0;               // columns the kernels blend
    int col0 = 0;                // contiguous: the columns are col0, col0 + 1, ...
    bool contiguous = true;      // else cols[col ... col + ncols) lists them
  };
  int oh = 0, ow = 0;
  std::vector<Roi> rois;
  std::vector<Lerp<T>> ys;        // y samples; lo/hi are feature rows
  std::vector<Lerp<T>> xs;        // x samples; lo/hi index the RoI's column list
  std::vector<int64_t> ybins;     // K * (oh + 1): [ybins[k*(oh+1)+ph], ...[ph+1]) are ph's y samples
  std::vector<int64_t> xbins;     // K * (ow + 1)
  std::vector<int32_t> cols;
  std::vector<int64_t> order;     // pooled RoIs grouped by (level, image), index order inside a group
  std::vector<int64_t> group_begin;  // G + 1 offsets into order; group g = level * N + n
  std::vector<int64_t> unpooled;

  const int64_t* ybin(int64_t k) const { return ybins.data() + k * (oh + 1); }
  const int64_t* xbin(int64_t k) const { return xbins.data() + k * (ow + 1); }
};

template <class T>
Plans<T> build_plans(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map, const RoiAlignOptions& opt) {
  using P = Plans<T>;
  P plans;
  const int64_t K = rois.size(0), N = lv.feat[0].size(0);
  const int oh = static_cast<int>(opt.pooled_h), ow = static_cast<int>(opt.pooled_w);
  const int sr = static_cast<int>(std::min<int64_t>(opt.sampling_ratio, detail::kMaxRoiGrid));
  plans.oh = oh;
  plans.ow = ow;
  plans.rois.resize(K);
  const T* r = rois.ptr<T>();

  auto geometry = [&](int64_t k, int level) {
    const T* b = r + 5 * k;
    return detail::roi_bins<T>(b[1], b[2], b[3], b[4], T(lv.scale[level]), oh, ow, sr, opt.aligned, opt.quantize);
  };

  // Pass 1: validate, assign levels, bound the sample counts.
  parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const T* q = r + 5 * k;
      for (int j = 0; j < 5; ++j)
        MRCNN_CHECK_VALUE(!detail::non_finite(q[j]), "rois[", k, "] contains a NaN or infinite value");
      typename P::Roi& R = plans.rois[k];
      MRCNN_CHECK_VALUE(detail::roi_batch_index(q[0], N, R.n), "rois[", k, ", 0] = ", q[0],
                        " is not an integer batch index in [0, ", N, ")");
      int level = 0;
      if (map)
        level = detail::fpn_level<T>(q[1], q[2], q[3], q[4], map->k_min, map->k_max, map->canonical_level,
                                     T(map->canonical_scale), map->detectron2);
      if (level < 0 || level >= lv.count) continue;
      R.level = level;
      const auto g = geometry(k, level);
      R.gh = g.grid_h;
      R.gw = g.grid_w;
      R.count = g.count;
      const int64_t H = lv.feat[level].size(2), W = lv.feat[level].size(3);
      int i0, i1;
      for (int p = 0; p < oh; ++p) {
        detail::sample_range(g.start_y, g.bin_h, p, g.grid_h, H, i0, i1);
        R.ycap += i1 - i0;
      }
      for (int p = 0; p < ow; ++p) {
        detail::sample_range(g.start_x, g.bin_w, p, g.grid_w, W, i0, i1);
        R.xcap += i1 - i0;
      }
    }
  });

  int64_t ny = 0, nx = 0;
  for (auto& R : plans.rois) {
    R.ys = ny;
    R.xs = nx;
    R.col = 2 * nx;
    ny += R.ycap;
    nx += R.xcap;
  }
  plans.ys.resize(ny);
  plans.xs.resize(nx);
  plans.cols.resize(2 * nx);
  plans.ybins.assign(K * (oh + 1), 0);
  plans.xbins.assign(K * (ow + 1), 0);

  // Pass 2: the valid samples and each RoI's sorted column list.
  parallel_for(0, K, 64, [&](int64_t b, int64_t e) {
    std::vector<int32_t> tmp;
    for (int64_t k = b; k < e; ++k) {
      typename P::Roi& R = plans.rois[k];
      if (R.level < 0) continue;
      const auto g = geometry(k, R.level);
      const int64_t H = lv.feat[R.level].size(2), W = lv.feat[R.level].size(3);
      int64_t* yb = plans.ybins.data() + k * (oh + 1);
      int64_t* xb = plans.xbins.data() + k * (ow + 1);
      int64_t cur = R.ys;
      int i0, i1;
      Lerp<T> s;
      for (int p = 0; p < oh; ++p) {
        yb[p] = cur;
        detail::sample_range(g.start_y, g.bin_h, p, g.grid_h, H, i0, i1);
        for (int i = i0; i < i1; ++i)
          if (detail::bilinear_at(detail::sample_pos(g.start_y, g.bin_h, p, i, g.grid_h), H, s)) plans.ys[cur++] = s;
      }
      yb[oh] = cur;
      cur = R.xs;
      for (int p = 0; p < ow; ++p) {
        xb[p] = cur;
        detail::sample_range(g.start_x, g.bin_w, p, g.grid_w, W, i0, i1);
        for (int i = i0; i < i1; ++i)
          if (detail::bilinear_at(detail::sample_pos(g.start_x, g.bin_w, p, i, g.grid_w), W, s)) plans.xs[cur++] = s;
      }
      xb[ow] = cur;
      tmp.clear();
      for (int64_t i = R.xs; i < cur; ++i) {
        tmp.push_back(plans.xs[i].lo);
        tmp.push_back(plans.xs[i].hi);
      }
      std::sort(tmp.begin(), tmp.end());
      tmp.erase(std::unique(tmp.begin(), tmp.end()), tmp.end());
      const int64_t span = tmp.empty() ? 0 : int64_t(tmp.back()) - tmp.front() + 1;
      // Blending the whole span is vectorised and beats gathering the used columns unless they are
      // sparse (large RoIs whose samples are several pixels apart).
      R.contiguous = span <= kSpanFactor * int64_t(tmp.size());
      if (R.contiguous) {
        R.col0 = tmp.empty() ? 0 : tmp.front();
        R.ncols = static_cast<int>(span);
        for (int64_t i = R.xs; i < cur; ++i) {
          plans.xs[i].lo -= R.col0;
          plans.xs[i].hi -= R.col0;
        }
      } else {
        std::copy(tmp.begin(), tmp.end(), plans.cols.begin() + R.col);
        R.ncols = static_cast<int>(tmp.size());
        for (int64_t i = R.xs; i < cur; ++i) {
          Lerp<T>& x = plans.xs[i];
          x.lo = static_cast<int>(std::lower_bound(tmp.begin(), tmp.end(), x.lo) - tmp.begin());
          x.hi = static_cast<int>(std::lower_bound(tmp.begin(), tmp.end(), x.hi) - tmp.begin());
        }
      }
    }
  });

  // Group by (level, image): a counting sort, stable, so RoIs keep index order inside a group.
  const int64_t G = int64_t(lv.count) * N;
  plans.group_begin.assign(G + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    const auto& R = plans.rois[k];
    if (R.level < 0) {
      plans.unpooled.push_back(k);
    } else {
      ++plans.group_begin[R.level * N + R.n + 1];
    }
  }
  for (int64_t g = 0; g < G; ++g) plans.group_begin[g + 1] += plans.group_begin[g];
  plans.order.resize(plans.group_begin[G]);
  std::vector<int64_t> fill(plans.group_begin.begin(), plans.group_begin.end() - 1);
  for (int64_t k = 0; k < K; ++k) {
    const auto& R = plans.rois[k];
    if (R.level >= 0) plans.order[fill[R.level * N + R.n]++] = k;
  }
  // Inside a group, visit RoIs by 16x16-pixel tile of their top-left sample: neighbours then reuse
  // rows already in L1. Ties keep index order, so the order (and the backward's summation order) is
  // a pure function of the RoIs.
  auto tile = [&](int64_t k) {
    const auto& R = plans.rois[k];
    const int64_t y = plans.ybins[k * (oh + 1) + oh] > plans.ybins[k * (oh + 1)] ? plans.ys[plans.ybins[k * (oh + 1)]].lo : 0;
    const int64_t x = R.contiguous ? R.col0 : (R.ncols ? plans.cols[R.col] : 0);
    return ((y >> 4) << 32) | (x >> 4);
  };
  for (int64_t g = 0; g < G; ++g) {
    std::vector<std::pair<int64_t, int64_t>> keyed;
    for (int64_t q = plans.group_begin[g]; q < plans.group_begin[g + 1]; ++q) keyed.emplace_back(tile(plans.order[q]), plans.order[q]);
    std::sort(keyed.begin(), keyed.end());
    for (size_t i = 0; i < keyed.size(); ++i) plans.order[plans.group_begin[g] + i] = keyed[i].second;
  }
  return plans;
}

// ---- kernels on one RoI and a vector of V channels ------------------------------------------------
// kV == 1: one channel of an NCHW plane; kV == 0: V channels at unit stride (channels-last).
// Feature rows are addressed as src + y * sy + col * sx + c.

template <class T> struct Scratch {
  std::vector<T> row, acc, best;
  std::vector<int64_t> argy, argx;
};

template <class T> T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// The columns a RoI blends: a run col0 .. col0 + n - 1, or a sorted list.
struct Cols {
  const int32_t* list;
  int col0, n;
  bool contiguous;
  int64_t operator[](int m) const { return contiguous ? int64_t(col0) + m : int64_t(list[m]); }
};

template <class T> Cols cols_of(const Plans<T>& P, const typename Plans<T>::Roi& R) {
  return Cols{P.cols.data() + R.col, R.col0, R.ncols, R.contiguous};
}

// dst[m, c] (+)= r0[col_m, c] * wlo + r1[col_m, c] * whi over the RoI's columns.
template <class T, int kV, bool kAccumulate>
inline void blend_rows(T* __restrict__ dst, const T* __restrict__ r0, const T* __restrict__ r1, T wlo, T whi,
                       const Cols& cols, int Vrt, int64_t sx) {
  const int V = kV ? kV : Vrt;
  if (cols.contiguous && sx == V) {
    const T* __restrict__ a = r0 + cols.col0 * sx;
    const T* __restrict__ b = r1 + cols.col0 * sx;
    const int64_t n = int64_t(cols.n) * V;
    for (int64_t i = 0; i < n; ++i) {
      const T v = detail::lerp<false>(a[i], b[i], wlo, whi);
      dst[i] = kAccumulate ? dst[i] + v : v;
    }
    return;
  }
  for (int m = 0; m < cols.n; ++m) {
    const T* __restrict__ a = r0 + cols[m] * sx;
    const T* __restrict__ b = r1 + cols[m] * sx;
    T* __restrict__ d = dst + int64_t(m) * V;
    for (int c = 0; c < V; ++c) {
      const T v = detail::lerp<false>(a[c], b[c], wlo, whi);
      d[c] = kAccumulate ? d[c] + v : v;
    }
  }
}

// grad_row[col_m, c] += w * src[m, c]
template <class T, int kV>
inline void scatter_row(T* __restrict__ grad_row, T w, const T* __restrict__ src, const Cols& cols, int Vrt,
                        int64_t sx) {
  const int V = kV ? kV : Vrt;
  if (cols.contiguous && sx == V) {
    T* __restrict__ g = grad_row + cols.col0 * sx;
    const int64_t n = int64_t(cols.n) * V;
    for (int64_t i = 0; i < n; ++i) g[i] += w * src[i];
    return;
  }
  for (int m = 0; m < cols.n; ++m) {
    T* __restrict__ g = grad_row + cols[m] * sx;
    const T* __restrict__ s = src + int64_t(m) * V;
    for (int c = 0; c < V; ++c) g[c] += w * s[c];
  }
}

// Output strides for the RoI's [C, oh, ow] slice (or grad_out's).
struct OutStrides {
  int64_t c, h, w;
};

// Max mode: the arg-max sample (y, x entries of the plan) of every (pw, c) of output row ph; best is the
// max over valid samples (-inf and argy = -1 if none). Sample order (iy, then ix) breaks ties.
template <class T, int kV>
void max_row(const Plans<T>& P, const typename Plans<T>::Roi& R, const int64_t* yb, const int64_t* xb, int ph,
             const T* src, int64_t sy, int64_t sx, int Vrt, Scratch<T>& s) {
  const int V = kV ? kV : Vrt;
  const int ow = P.ow;
  const Cols cols = cols_of(P, R);
  T* row = grow(s.row, size_t(cols.n) * V);
  T* best = grow(s.best, size_t(ow) * V);
  int64_t* argy = grow(s.argy, size_t(ow) * V);
  int64_t* argx = grow(s.argx, size_t(ow) * V);
  std::fill_n(best, size_t(ow) * V, -std::numeric_limits<T>::infinity());
  std::fill_n(argy, size_t(ow) * V, int64_t(-1));
  for (int64_t j = yb[ph]; j < yb[ph + 1]; ++j) {
    const Lerp<T>& y = P.ys[j];
    blend_rows<T, kV, false>(row, src + y.lo * sy, src + y.hi * sy, y.wlo, y.whi, cols, V, sx);
    for (int pw = 0; pw < ow; ++pw) {
      T* bst = best + int64_t(pw) * V;
      int64_t* ay = argy + int64_t(pw) * V;
      int64_t* ax = argx + int64_t(pw) * V;
      for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
        const Lerp<T>& x = P.xs[i];
        const T* a = row + int64_t(x.lo) * V;
        const T* b = row + int64_t(x.hi) * V;
        for (int c = 0; c < V; ++c) {
          const T v = detail::lerp<false>(a[c], b[c], x.wlo, x.whi);
          if (v > bst[c]) {
            bst[c] = v;
            ay[c] = j;
            ax[c] = i;
          }
        }
      }
    }
  }
}

template <class T, int kV>
void forward_roi(const Plans<T>& P, int64_t k, bool max_mode, const T* src, int64_t sy, int64_t sx, int Vrt,
                 T* out, OutStrides os, Scratch<T>& s) {
  const int V = kV ? kV : Vrt;
  const auto& R = P.rois[k];
  const int oh = P.oh, ow = P.ow;
  const int64_t* yb = P.ybin(k);
  const int64_t* xb = P.xbin(k);
  if (max_mode) {
    for (int ph = 0; ph < oh; ++ph) {
      max_row<T, kV>(P, R, yb, xb, ph, src, sy, sx, V, s);
      const bool y_invalid = yb[ph + 1] - yb[ph] < R.gh;
      for (int pw = 0; pw < ow; ++pw) {
        const bool has_invalid = y_invalid || xb[pw + 1] - xb[pw] < R.gw;
        const T* bst = s.best.data() + int64_t(pw) * V;
        const int64_t* ay = s.argy.data() + int64_t(pw) * V;
        T* o = out + ph * os.h + pw * os.w;
        for (int c = 0; c < V; ++c)
          o[c * os.c] = detail::max_bin_takes_sample(ay[c] >= 0, bst[c], has_invalid) ? bst[c] : T(0);
      }
    }
    return;
  }
  const Cols cols = cols_of(P, R);
  T* __restrict__ row = grow(s.row, size_t(cols.n) * V);
  T* __restrict__ acc = grow(s.acc, size_t(V));
  const Lerp<T>* __restrict__ xs = P.xs.data();
  for (int ph = 0; ph < oh; ++ph) {
    T* o = out + ph * os.h;
    if (yb[ph + 1] == yb[ph]) {  // no valid y sample: the whole output row is 0
      for (int pw = 0; pw < ow; ++pw)
        for (int c = 0; c < V; ++c) o[pw * os.w + c * os.c] = T(0);
      continue;
    }
    std::fill_n(row, size_t(cols.n) * V, T(0));
    for (int64_t j = yb[ph]; j < yb[ph + 1]; ++j) {
      const Lerp<T>& y = P.ys[j];
      blend_rows<T, kV, true>(row, src + y.lo * sy, src + y.hi * sy, y.wlo, y.whi, cols, V, sx);
    }
    for (int pw = 0; pw < ow; ++pw) {
      if (kV == 1) {
        T a = T(0);
        for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i)
          a += detail::lerp<false>(row[xs[i].lo], row[xs[i].hi], xs[i].wlo, xs[i].whi);
        o[pw * os.w] = a / R.count;
        continue;
      }
      std::fill_n(acc, V, T(0));
      for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
        const Lerp<T> x = xs[i];
        const T* __restrict__ a = row + int64_t(x.lo) * V;
        const T* __restrict__ b = row + int64_t(x.hi) * V;
        for (int c = 0; c < V; ++c) acc[c] += detail::lerp<false>(a[c], b[c], x.wlo, x.whi);
      }
      for (int c = 0; c < V; ++c) o[pw * os.w + c * os.c] = acc[c] / R.count;
    }
  }
}

template <class T, int kV>
void backward_roi(const Plans<T>& P, int64_t k, bool max_mode, const T* src, T* grad, int64_t sy, int64_t sx,
                  int Vrt, const T* gout, OutStrides gs, Scratch<T>& s) {
  const int V = kV ? kV : Vrt;
  const auto& R = P.rois[k];
  const int oh = P.oh, ow = P.ow;
  const int64_t* yb = P.ybin(k);
  const int64_t* xb = P.xbin(k);
  const Cols cols = cols_of(P, R);
  if (max_mode) {
    for (int ph = 0; ph < oh; ++ph) {
      max_row<T, kV>(P, R, yb, xb, ph, src, sy, sx, V, s);
      const bool y_invalid = yb[ph + 1] - yb[ph] < R.gh;
      for (int pw = 0; pw < ow; ++pw) {
        const bool has_invalid = y_invalid || xb[pw + 1] - xb[pw] < R.gw;
        const T* bst = s.best.data() + int64_t(pw) * V;
        const int64_t* ay = s.argy.data() + int64_t(pw) * V;
        const int64_t* ax = s.argx.data() + int64_t(pw) * V;
        const T* g = gout + ph * gs.h + pw * gs.w;
        for (int c = 0; c < V; ++c) {
          if (!detail::max_bin_takes_sample(ay[c] >= 0, bst[c], has_invalid)) continue;
          const Lerp<T>& y = P.ys[ay[c]];
          const Lerp<T>& x = P.xs[ax[c]];
          T w[4];
          detail::corner_weights(y, x, w);
          const T gc = g[c * gs.c];
          const int64_t xl = cols[x.lo] * sx + c, xh = cols[x.hi] * sx + c;
          grad[y.lo * sy + xl] += gc * w[0];
          grad[y.lo * sy + xh] += gc * w[1];
          grad[y.hi * sy + xl] += gc * w[2];
          grad[y.hi * sy + xh] += gc * w[3];
        }
      }
    }
    return;
  }
  T* __restrict__ row = grow(s.row, size_t(cols.n) * V);
  // Channels-last: the RoI's gradient slice, bin-major with the block's channels innermost. Gathered once
  // per RoI channel by channel (grad_out is usually NCHW-contiguous: each channel's bins are one run), not
  // V strided loads per bin, which missed the cache on every load.
  T* __restrict__ gt = nullptr;
  if (kV != 1) {
    gt = grow(s.acc, size_t(oh) * ow * V);
    for (int c = 0; c < V; ++c)
      for (int ph = 0; ph < oh; ++ph)
        for (int pw = 0; pw < ow; ++pw) gt[(ph * ow + pw) * V + c] = gout[c * gs.c + ph * gs.h + pw * gs.w] / R.count;
  }
  const Lerp<T>* __restrict__ xs = P.xs.data();
  for (int ph = 0; ph < oh; ++ph) {
    if (yb[ph + 1] == yb[ph]) continue;
    std::fill_n(row, size_t(cols.n) * V, T(0));
    for (int pw = 0; pw < ow; ++pw) {
      if (kV == 1) {
        const T gv = gout[ph * gs.h + pw * gs.w] / R.count;
        for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
          row[xs[i].lo] += gv * xs[i].wlo;
          row[xs[i].hi] += gv * xs[i].whi;
        }
        continue;
      }
      const T* __restrict__ g = gt + (ph * ow + pw) * V;
      for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
        const Lerp<T> x = xs[i];
        T* __restrict__ a = row + int64_t(x.lo) * V;
        for (int c = 0; c < V; ++c) a[c] += g[c] * x.wlo;
        T* __restrict__ b = row + int64_t(x.hi) * V;
        for (int c = 0; c < V; ++c) b[c] += g[c] * x.whi;
      }
    }
    for (int64_t j = yb[ph]; j < yb[ph + 1]; ++j) {
      const Lerp<T>& y = P.ys[j];
      // Separate calls: lo and hi are the same row at the bottom edge.
      scatter_row<T, kV>(grad + y.lo * sy, y.wlo, row, cols, V, sx);
      scatter_row<T, kV>(grad + y.hi * sy, y.whi, row, cols, V, sx);
    }
  }
}

// NCHW, average: kNC channel planes (at stride sc) per RoI visit, so the plan is read and the loops run
// once for all of them. Per element the operations and their order are those of forward_roi /
// backward_roi, so the result does not depend on kNC (nor on the layout).
template <class T, int kNC>
void forward_planes(const Plans<T>& P, int64_t k, const T* src, int64_t sc, int64_t sy, T* out, OutStrides os,
                    Scratch<T>& s) {
  const auto& R = P.rois[k];
  const int64_t* yb = P.ybin(k);
  const int64_t* xb = P.xbin(k);
  const Cols cols = cols_of(P, R);
  const int64_t n = cols.n;
  T* __restrict__ rows = grow(s.row, size_t(n) * kNC);
  const Lerp<T>* __restrict__ xs = P.xs.data();
  for (int ph = 0; ph < P.oh; ++ph) {
    T* o = out + ph * os.h;
    if (yb[ph + 1] == yb[ph]) {
      for (int c = 0; c < kNC; ++c)
        for (int pw = 0; pw < P.ow; ++pw) o[c * os.c + pw * os.w] = T(0);
      continue;
    }
    std::fill_n(rows, size_t(n) * kNC, T(0));
    for (int64_t j = yb[ph]; j < yb[ph + 1]; ++j) {
      const Lerp<T> y = P.ys[j];
      for (int c = 0; c < kNC; ++c)
        blend_rows<T, 1, true>(rows + c * n, src + c * sc + y.lo * sy, src + c * sc + y.hi * sy, y.wlo, y.whi, cols, 1, 1);
    }
    for (int pw = 0; pw < P.ow; ++pw) {
      T acc[kNC];
      for (int c = 0; c < kNC; ++c) acc[c] = T(0);
      for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
        const Lerp<T> x = xs[i];
        for (int c = 0; c < kNC; ++c) acc[c] += detail::lerp<false>(rows[c * n + x.lo], rows[c * n + x.hi], x.wlo, x.whi);
      }
      for (int c = 0; c < kNC; ++c) o[c * os.c + pw * os.w] = acc[c] / R.count;
    }
  }
}

template <class T, int kNC>
void backward_planes(const Plans<T>& P, int64_t k, T* grad, int64_t sc, int64_t sy, const T* gout, OutStrides gs,
                     Scratch<T>& s) {
  const auto& R = P.rois[k];
  const int64_t* yb = P.ybin(k);
  const int64_t* xb = P.xbin(k);
  const Cols cols = cols_of(P, R);
  const int64_t n = cols.n;
  T* __restrict__ rows = grow(s.row, size_t(n) * kNC);
  const Lerp<T>* __restrict__ xs = P.xs.data();
  for (int ph = 0; ph < P.oh; ++ph) {
    if (yb[ph + 1] == yb[ph]) continue;
    std::fill_n(rows, size_t(n) * kNC, T(0));
    for (int pw = 0; pw < P.ow; ++pw) {
      T gv[kNC];
      for (int c = 0; c < kNC; ++c) gv[c] = gout[c * gs.c + ph * gs.h + pw * gs.w] / R.count;
      for (int64_t i = xb[pw]; i < xb[pw + 1]; ++i) {
        const Lerp<T> x = xs[i];
        for (int c = 0; c < kNC; ++c) {
          rows[c * n + x.lo] += gv[c] * x.wlo;
          rows[c * n + x.hi] += gv[c] * x.whi;
        }
      }
    }
    for (int64_t j = yb[ph]; j < yb[ph + 1]; ++j) {
      const Lerp<T> y = P.ys[j];
      for (int c = 0; c < kNC; ++c) {
        // Separate calls: lo and hi are the same row at the bottom edge.
        scatter_row<T, 1>(grad + c * sc + y.lo * sy, y.wlo, rows + c * n, cols, 1, 1);
        scatter_row<T, 1>(grad + c * sc + y.hi * sy, y.whi, rows + c * n, cols, 1, 1);
      }
    }
  }
}

// ---- drivers ---------------------------------------------------------------------------------------

// RoIs visit a plane in random places, and each first touch of a line would be a DRAM round trip.
// Reading the plane in order first lets the hardware prefetcher stream it into L2 at full bandwidth.
constexpr int64_t kWarmMinRois = 8;
// Channels pooled per RoI visit on NCHW features (their planes should fit L2 together).
constexpr int kPlanes = 4;
template <class T> void warm(const T* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  T acc = T(0);
  for (int64_t i = 0; i < n; i += kLine) acc += p[i];
  volatile T sink = acc;
  (void)sink;
}

bool all_nchw(const RoiLevels& lv) {
  for (int l = 0; l < lv.count; ++l)
    if (!lv.feat[l].is_contiguous()) return false;
  return true;
}

// Channel block for the channels-last backward: enough blocks to balance the threads; the result does
// not depend on it (each element sees the same operations in the same order).
int64_t channel_block(int64_t C) {
  const int64_t want = std::max<int64_t>(1, int64_t(get_num_threads()) * 4);
  return std::min<int64_t>(C, std::max<int64_t>(16, (C + want - 1) / want));
}

template <class T>
void forward_impl(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map, const RoiAlignOptions& opt,
                  const TensorView& out) {
  const Plans<T> P = build_plans<T>(lv, rois, map, opt);
  const int64_t N = lv.feat[0].size(0), C = lv.feat[0].size(1), L = lv.count, G = L * N;
  const bool max_mode = opt.mode == RoiPoolMode::Max;
  T* o = out.ptr<T>();
  const OutStrides os{out.stride(1), out.stride(2), out.stride(3)};
  const int64_t oK = out.stride(0);
  for (int64_t k : P.unpooled)
    for (int64_t c = 0; c < C; ++c)
      for (int ph = 0; ph < P.oh; ++ph)
        for (int pw = 0; pw < P.ow; ++pw) o[k * oK + c * os.c + ph * os.h + pw * os.w] = T(0);

  if (all_nchw(lv)) {
    // Tasks: (block of kPlanes channels, level, image); the block's planes are warmed into L2 and every
    // RoI of that image and level is pooled from them.
    const int64_t nblk = (C + kPlanes - 1) / kPlanes;
    parallel_for(0, nblk * G, 1, [&](int64_t b, int64_t e) {
      Scratch<T> s;
      for (int64_t t = b; t < e; ++t) {
        const int64_t c0 = (t / G) * kPlanes, g = t % G, l = g / N, n = g % N;
        const int64_t nc = std::min<int64_t>(kPlanes, C - c0);
        if (P.group_begin[g + 1] == P.group_begin[g]) continue;
        const TensorView& f = lv.feat[l];
        const T* src = f.ptr<T>() + n * f.stride(0) + c0 * f.stride(1);
        if (P.group_begin[g + 1] - P.group_begin[g] >= kWarmMinRois)
          for (int64_t c = 0; c < nc; ++c) warm(src + c * f.stride(1), f.size(2) * f.size(3));
        for (int64_t q = P.group_begin[g]; q < P.group_begin[g + 1]; ++q) {
          const int64_t k = P.order[q];
          T* ok = o + k * oK + c0 * os.c;
          if (!max_mode && nc == kPlanes) {
            forward_planes<T, kPlanes>(P, k, src, f.stride(1), f.stride(2), ok, os, s);
            continue;
          }
          for (int64_t c = 0; c < nc; ++c)
            forward_roi<T, 1>(P, k, max_mode, src + c * f.stride(1), f.stride(2), 1, 1, ok + c * os.c, os, s);
        }
      }
    });
    return;
  }
  parallel_for(0, int64_t(P.order.size()), 4, [&](int64_t b, int64_t e) {
    Scratch<T> s;
    for (int64_t q = b; q < e; ++q) {
      const int64_t k = P.order[q];
      const auto& R = P.rois[k];
      const TensorView& f = lv.feat[R.level];
      const T* src = f.ptr<T>() + R.n * f.stride(0);
      forward_roi<T, 0>(P, k, max_mode, src, f.stride(2), f.stride(3), static_cast<int>(C), o + k * oK, os, s);
    }
  });
}

template <class T>
void backward_impl(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map,
                   const RoiAlignOptions& opt) {
  const Plans<T> P = build_plans<T>(lv, rois, map, opt);
  const int64_t N = lv.feat[0].size(0), C = lv.feat[0].size(1), L = lv.count, G = L * N;
  const bool max_mode = opt.mode == RoiPoolMode::Max;
  const T* go = grad_out.ptr<T>();
  const OutStrides gs{grad_out.stride(1), grad_out.stride(2), grad_out.stride(3)};
  const int64_t gK = grad_out.stride(0);

  if (all_nchw(lv)) {
    // Tasks own the gradient planes of (block of kPlanes channels, level, image): zero-fill them, then
    // add the group's RoIs in plan order. No two tasks write the same element, and each element's sum
    // is formed in the same order whatever the thread count.
    const int64_t nblk = (C + kPlanes - 1) / kPlanes;
    parallel_for(0, nblk * G, 1, [&](int64_t b, int64_t e) {
      Scratch<T> s;
      for (int64_t t = b; t < e; ++t) {
        const int64_t c0 = (t / G) * kPlanes, g = t % G, l = g / N, n = g % N;
        const int64_t nc = std::min<int64_t>(kPlanes, C - c0);
        const TensorView& f = lv.feat[l];
        const int64_t off = n * f.stride(0) + c0 * f.stride(1), sc = f.stride(1);
        T* grad = lv.grad[l].ptr<T>() + off;
        const T* src = f.ptr<T>() + off;
        for (int64_t c = 0; c < nc; ++c) std::fill_n(grad + c * sc, f.size(2) * f.size(3), T(0));
        if (max_mode && P.group_begin[g + 1] - P.group_begin[g] >= kWarmMinRois)
          for (int64_t c = 0; c < nc; ++c) warm(src + c * sc, f.size(2) * f.size(3));
        for (int64_t q = P.group_begin[g]; q < P.group_begin[g + 1]; ++q) {
          const int64_t k = P.order[q];
          const T* gk = go + k * gK + c0 * gs.c;
          if (!max_mode && nc == kPlanes) {
            backward_planes<T, kPlanes>(P, k, grad, sc, f.stride(2), gk, gs, s);
            continue;
          }
          for (int64_t c = 0; c < nc; ++c)
            backward_roi<T, 1>(P, k, max_mode, src + c * sc, grad + c * sc, f.stride(2), 1, 1, gk + c * gs.c, gs, s);
        }
      }
    });
    return;
  }
  const int64_t cb = channel_block(C), nblocks = (C + cb - 1) / cb;
  parallel_for(0, nblocks, 1, [&](int64_t b, int64_t e) {
    Scratch<T> s;
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * cb;
      const int V = static_cast<int>(std::min(cb, C - c0));
      for (int l = 0; l < L; ++l) {
        const TensorView& f = lv.feat[l];
        T* g = lv.grad[l].ptr<T>();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t y = 0; y < f.size(2); ++y)
            for (int64_t x = 0; x < f.size(3); ++x)
              std::fill_n(g + n * f.stride(0) + y * f.stride(2) + x * f.stride(3) + c0, V, T(0));
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t l = g / N, n = g % N;
        const TensorView& f = lv.feat[l];
        const int64_t off = n * f.stride(0) + c0;
        for (int64_t q = P.group_begin[g]; q < P.group_begin[g + 1]; ++q) {
          const int64_t k = P.order[q];
          backward_roi<T, 0>(P, k, max_mode, f.ptr<T>() + off, lv.grad[l].ptr<T>() + off, f.stride(2), f.stride(3), V,
                             go + k * gK + c0 * gs.c, gs, s);
        }
      }
    }
  });
}

}  // namespace

void roi_align_forward_cpu(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map,
                           const RoiAlignOptions& opt, const TensorView& out) {
  MRCNN_DISPATCH_CPU_FLOAT(lv.feat[0].dtype, "roi_align", [&] { forward_impl<scalar_t>(lv, rois, map, opt, out); });
}

void roi_align_backward_cpu(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois,
                            const FpnLevelMap* map, const RoiAlignOptions& opt) {
  MRCNN_DISPATCH_CPU_FLOAT(lv.feat[0].dtype, "roi_align_backward",
                           [&] { backward_impl<scalar_t>(grad_out, lv, rois, map, opt); });
}

void fpn_level_assign_cpu(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels) {
  const int64_t K = boxes.size(0), w = boxes.size(1), off = w - 4;
  int64_t* out = levels.ptr<int64_t>();
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "fpn_level_assign", [&] {
    const scalar_t* b = boxes.ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* q = b + k * w + off;
      out[k] = detail::fpn_level<scalar_t>(q[0], q[1], q[2], q[3], map.k_min, map.k_max, map.canonical_level,
                                           scalar_t(map.canonical_scale), map.detectron2);
    }
  });
}

}  // namespace mrcnn
