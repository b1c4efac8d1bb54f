// NMS on the CPU: stable radix sort of the scores, then blocked greedy suppression over boxes in
// structure-of-arrays form (the building blocks in nms_cpu.h are shared with proposals_cpu.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/common/simd.h"
#include "mrcnn/ops/detail/box_math.h"
#include "mrcnn/ops/detail/nms_math.h"
#include "mrcnn/ops/nms.h"
#include "nms_cpu.h"

// The IoU loops are the hot spot: compiled for AVX2 as well (MRCNN_SIMD_CLONES). FMA is not enabled with
// it on purpose (contracting inter = w * h into the union would change the rounding).

namespace mrcnn {
namespace cpu {
namespace {

// f[j] |= IoU(a, b_j) > thr for the n boxes b.
template <class T>
MRCNN_ALWAYS_INLINE void suppress_by_one_impl(T ax1, T ay1, T ax2, T ay2, T aa, const T* __restrict x1,
                                              const T* __restrict y1, const T* __restrict x2, const T* __restrict y2,
                                              const T* __restrict area, int64_t n, T thr, uint8_t* __restrict f) {
  for (int64_t j = 0; j < n; ++j) {
    const T iou = detail::box_iou_parts(ax1, ay1, ax2, ay2, aa, x1[j], y1[j], x2[j], y2[j], area[j]);
    f[j] |= static_cast<uint8_t>(iou > thr);
  }
}

// The same for nk suppressors at once, tiled over the candidates so a tile stays in L1 while every
// suppressor passes over it.
template <class T>
MRCNN_ALWAYS_INLINE void suppress_by_many_impl(const T* kx1, const T* ky1, const T* kx2, const T* ky2, const T* ka,
                                               int nk, const T* x1, const T* y1, const T* x2, const T* y2,
                                               const T* area, int64_t n, T thr, uint8_t* f) {
  constexpr int64_t kTile = 1024;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    for (int k = 0; k < nk; ++k)
      suppress_by_one_impl(kx1[k], ky1[k], kx2[k], ky2[k], ka[k], x1 + t, y1 + t, x2 + t, y2 + t, area + t, len,
                           thr, f + t);
  }
}

MRCNN_SIMD_CLONES void suppress_by_one(float ax1, float ay1, float ax2, float ay2, float aa, const float* x1,
                                       const float* y1, const float* x2, const float* y2, const float* area,
                                       int64_t n, float thr, uint8_t* f) {
  suppress_by_one_impl(ax1, ay1, ax2, ay2, aa, x1, y1, x2, y2, area, n, thr, f);
}
MRCNN_SIMD_CLONES void suppress_by_one(double ax1, double ay1, double ax2, double ay2, double aa, const double* x1,
                                       const double* y1, const double* x2, const double* y2, const double* area,
                                       int64_t n, double thr, uint8_t* f) {
  suppress_by_one_impl(ax1, ay1, ax2, ay2, aa, x1, y1, x2, y2, area, n, thr, f);
}
MRCNN_SIMD_CLONES void suppress_by_many(const float* kx1, const float* ky1, const float* kx2, const float* ky2,
                                        const float* ka, int nk, const float* x1, const float* y1, const float* x2,
                                        const float* y2, const float* area, int64_t n, float thr, uint8_t* f) {
  suppress_by_many_impl(kx1, ky1, kx2, ky2, ka, nk, x1, y1, x2, y2, area, n, thr, f);
}
MRCNN_SIMD_CLONES void suppress_by_many(const double* kx1, const double* ky1, const double* kx2, const double* ky2,
                                        const double* ka, int nk, const double* x1, const double* y1,
                                        const double* x2, const double* y2, const double* area, int64_t n,
                                        double thr, uint8_t* f) {
  suppress_by_many_impl(kx1, ky1, kx2, ky2, ka, nk, x1, y1, x2, y2, area, n, thr, f);
}

// Candidates are processed in blocks: the kept boxes of a block are found sequentially within the
// block, then suppress all later candidates in one vectorised (and, when large, parallel) sweep, after
// which the survivors are compacted. Later blocks therefore only see boxes nobody suppressed yet, so
// the work is close to (kept boxes) x (alive boxes) rather than N^2.
constexpr int kBlock = 64;
// Below this many IoUs a sweep runs on the calling thread (waking the pool costs ~10 us).
constexpr int64_t kParallelWork = int64_t(1) << 18;

}  // namespace

template <class T>
int64_t greedy_nms(BoxSpan<T> c, int64_t m, T thr, int64_t max_out, int32_t* kept, uint8_t* flags, bool parallel) {
  if (max_out <= 0 || m <= 0) return 0;
  T* __restrict x1 = c.x1;
  T* __restrict y1 = c.y1;
  T* __restrict x2 = c.x2;
  T* __restrict y2 = c.y2;
  T* __restrict area = c.area;
  int32_t* __restrict id = c.id;
  alignas(64) T kx1[kBlock], ky1[kBlock], kx2[kBlock], ky2[kBlock], ka[kBlock];
  int64_t nk = 0;
  for (int64_t p = 0; p < m;) {
    const int64_t bend = std::min<int64_t>(p + kBlock, m);
    std::fill(flags + p, flags + bend, uint8_t(0));
    int nb = 0;
    for (int64_t i = p; i < bend; ++i) {
      if (flags[i]) continue;
      kept[nk++] = id[i];
      if (nk == max_out) return nk;
      kx1[nb] = x1[i], ky1[nb] = y1[i], kx2[nb] = x2[i], ky2[nb] = y2[i], ka[nb] = area[i];
      ++nb;
      suppress_by_one(x1[i], y1[i], x2[i], y2[i], area[i], x1 + i + 1, y1 + i + 1, x2 + i + 1, y2 + i + 1,
                      area + i + 1, bend - i - 1, thr, flags + i + 1);
    }
    const int64_t rn = m - bend;
    if (rn == 0) break;
    uint8_t* rf = flags + bend;
    std::fill(rf, rf + rn, uint8_t(0));
    auto sweep = [&](int64_t b, int64_t e) {
      suppress_by_many(kx1, ky1, kx2, ky2, ka, nb, x1 + bend + b, y1 + bend + b, x2 + bend + b, y2 + bend + b,
                       area + bend + b, e - b, thr, rf + b);
    };
    if (parallel && int64_t(nb) * rn >= kParallelWork) {
      parallel_for(0, rn, std::max<int64_t>(2048, kParallelWork / nb), sweep);
    } else {
      sweep(0, rn);
    }
    int64_t w = bend;
    for (int64_t j = bend; j < m; ++j) {
      x1[w] = x1[j], y1[w] = y1[j], x2[w] = x2[j], y2[w] = y2[j], area[w] = area[j], id[w] = id[j];
      w += !flags[j];
    }
    m = w;
    p = bend;
  }
  return nk;
}

template int64_t greedy_nms<float>(BoxSpan<float>, int64_t, float, int64_t, int32_t*, uint8_t*, bool);
template int64_t greedy_nms<double>(BoxSpan<double>, int64_t, double, int64_t, int32_t*, uint8_t*, bool);

}  // namespace cpu

namespace {

template <class T> bool all_finite(const T* p, int64_t n) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= detail::non_finite(p[i]);
  return !bad;
}

template <class T>
void nms_cpu_impl(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
                  const TensorView& keep, const TensorView& count) {
  using Key = decltype(detail::desc_key(T(0)));
  const int64_t n = boxes.size(0);
  const int64_t max_out = keep.size(0);
  const T* b = boxes.ptr<T>();
  const T* s = scores.ptr<T>();
  int64_t* keep_out = keep.ptr<int64_t>();
  MRCNN_CHECK_VALUE(all_finite(b, 4 * n), "boxes contains NaN or infinite values");
  MRCNN_CHECK_VALUE(all_finite(s, n), "scores contains NaN or infinite values");

  // Stable descending order of the scores.
  std::vector<Key> keys(n), tmp_keys(n);
  std::vector<int32_t> order(n), tmp_order(n);
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = detail::desc_key(s[i]);
    order[i] = static_cast<int32_t>(i);
  }
  cpu::radix_sort_pairs(keys.data(), order.data(), n, tmp_keys.data(), tmp_order.data());

  // Class segments: a stable sort of the visiting positions by class keeps score order inside each.
  std::vector<int32_t> seg_pos(n);  // visiting positions grouped by class
  std::vector<int64_t> seg_start{0};
  if (idxs) {
    const int64_t* cls = idxs->ptr<int64_t>();
    std::vector<uint64_t> ck(n), tmp_ck(n);
    for (int64_t p = 0; p < n; ++p) {
      ck[p] = static_cast<uint64_t>(cls[order[p]]) ^ (uint64_t(1) << 63);
      seg_pos[p] = static_cast<int32_t>(p);
    }
    cpu::radix_sort_pairs(ck.data(), seg_pos.data(), n, tmp_ck.data(), tmp_order.data());
    for (int64_t p = 1; p < n; ++p)
      if (ck[p] != ck[p - 1]) seg_start.push_back(p);
  } else {
    for (int64_t p = 0; p < n; ++p) seg_pos[p] = static_cast<int32_t>(p);
  }
  seg_start.push_back(n);
  const int64_t nseg = static_cast<int64_t>(seg_start.size()) - 1;

  cpu::BoxStore<T> store;
  store.resize(n);
  std::vector<uint8_t> flags(n);
  std::vector<int32_t> kept(n);  // per segment: kept visiting positions at [seg_start, ...)
  std::vector<int64_t> seg_kept(nseg);
  const T thr = detail::threshold_below(iou_threshold, T(0));
  // One class: parallelise inside the sweep; several: across classes (never both, the pool is not
  // re-entrant).
  const bool one = nseg == 1;
  auto run_segments = [&](int64_t sb, int64_t se) {
    for (int64_t sg = sb; sg < se; ++sg) {
      const int64_t lo = seg_start[sg], m = seg_start[sg + 1] - lo;
      cpu::BoxSpan<T> c = store.span(lo);
      for (int64_t q = 0; q < m; ++q) {
        const int32_t p = seg_pos[lo + q];
        const T* bb = b + 4 * int64_t(order[p]);
        c.x1[q] = bb[0], c.y1[q] = bb[1], c.x2[q] = bb[2], c.y2[q] = bb[3];
        c.area[q] = detail::box_area(bb[0], bb[1], bb[2], bb[3]);
        c.id[q] = p;
      }
      seg_kept[sg] = cpu::greedy_nms(c, m, thr, max_out, kept.data() + lo, flags.data() + lo, one);
    }
  };
  if (one) {
    run_segments(0, 1);
  } else {
    parallel_for(0, nseg, 1, run_segments);
  }

  // Kept visiting positions of all classes, back in global score order.
  int64_t total = 0;
  for (int64_t sg = 0; sg < nseg; ++sg) {
    std::copy_n(kept.data() + seg_start[sg], seg_kept[sg], tmp_order.data() + total);
    total += seg_kept[sg];
  }
  if (nseg > 1) std::sort(tmp_order.begin(), tmp_order.begin() + total);
  const int64_t nkeep = std::min(total, max_out);
  for (int64_t r = 0; r < nkeep; ++r) keep_out[r] = order[tmp_order[r]];
  std::fill(keep_out + nkeep, keep_out + max_out, int64_t(-1));
  *count.ptr<int64_t>() = nkeep;
}

}  // namespace

void nms_cpu(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
             const TensorView& keep, const TensorView& count) {
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "nms", [&] {
    nms_cpu_impl<scalar_t>(boxes, scores, idxs, iou_threshold, keep, count);
  });
}

}  // namespace mrcnn
