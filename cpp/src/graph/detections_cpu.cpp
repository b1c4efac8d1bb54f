// Stage 2's selection on the CPU: softmax, class-specific decode, clip, score threshold and small-box removal
// per (RoI, class) pair in parallel over the RoIs; then per image the candidates grouped by class (in score
// order), class-aware greedy NMS in parallel over every (image, class) pair, and the best D per image.
//
// Order and ties as postprocess.select_detections: the candidates of an image are in (RoI, class) order, the
// NMS visits them in a stable descending sort of the scores, and the kept ones come out in that order, so
// equal scores rank by RoI, then by class.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "graph_cpu.h"
#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/detail/box_coder_math.h"
#include "mrcnn/ops/detail/box_math.h"
#include "mrcnn/ops/detail/nms_math.h"
#include "../ops/nms_cpu.h"

namespace mrcnn {

template <class T>
void select_detections_cpu(const TensorView& class_logits, const TensorView& box_regression,
                           const TensorView& proposals, const TensorView& counts, const TensorView& image_sizes,
                           const GraphConfig& cfg, DetectionScratch& ws, const GraphDetections& dets) {
  using Key = decltype(detail::desc_key(T(0)));
  const int64_t n = proposals.size(0), p = proposals.size(1), c1 = class_logits.size(1), nc = c1 - 1;
  const int64_t d = cfg.detections_per_image;
  const int64_t* cnt = counts.ptr<int64_t>();
  const double* hw = image_sizes.ptr<double>();
  int64_t* start = ws.start.as<int64_t>(n + 1);
  start[0] = 0;
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + cnt[i];
  const int64_t r = start[n], m = r * nc;

  T* score = ws.score.as<T>(m);
  T* box = ws.box.as<T>(4 * m);
  uint8_t* valid = ws.valid.as<uint8_t>(m);
  int32_t* row_image = ws.order.as<int32_t>(r);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = start[i]; j < start[i + 1]; ++j) row_image[j] = int32_t(i);

  // Softmax, decode, clip, threshold, size test of every (RoI, foreground class) pair.
  const T thr = T(cfg.score_thresh), min_side = T(cfg.min_box_side);
  const auto cp = detail::coder_params<T>(cfg.box_coder);
  const T* logits = class_logits.ptr<T>();
  const T* deltas = box_regression.ptr<T>();
  const T* props = proposals.ptr<T>();
  parallel_for(0, r, 16, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const int64_t i = row_image[row], j = row - start[i];
      const T h = T(hw[2 * i]), w = T(hw[2 * i + 1]);
      const T* x = logits + row * c1;
      T mx = x[0];
      for (int64_t c = 1; c < c1; ++c) mx = x[c] > mx || std::isnan(x[c]) ? x[c] : mx;
      T sum = detail::exp_t(x[0] - mx);
      T* s = score + row * nc;
      for (int64_t c = 1; c < c1; ++c) {
        s[c - 1] = detail::exp_t(x[c] - mx);
        sum += s[c - 1];
      }
      const T* prop = props + 4 * (i * p + j);
      for (int64_t c = 1; c < c1; ++c) {
        const int64_t q = row * nc + c - 1;
        s[c - 1] = s[c - 1] / sum;
        bool ok = s[c - 1] > thr;
        if (ok) {
          T* bx = box + 4 * q;
          detail::decode_box(deltas + row * 4 * c1 + 4 * c, prop, cp, bx);
          detail::clip_box(bx, h, w);
          // min_box_side 0: no size filter (detectron2's fast_rcnn_inference)
          ok = min_side <= T(0) || detail::box_big_enough(bx, min_side);
        }
        valid[q] = ok;
      }
    }
  });

  // Per image: the valid candidates grouped by class (counting sort), each class in stable descending score order.
  int32_t* cand = ws.cand.as<int32_t>(m);        // image i's candidates at [start[i] * nc, ...), local ids
  int64_t* seg = ws.seg.as<int64_t>(n * (nc + 1));  // class c's candidates of image i: [seg[c], seg[c + 1])
  int64_t* next = ws.next.as<int64_t>(n * nc);       // counting sort: next free slot of each class
  parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t base = start[i] * nc, mi = cnt[i] * nc;
      int64_t* sg = seg + i * (nc + 1);
      std::fill(sg, sg + nc + 1, int64_t(0));
      for (int64_t q = 0; q < mi; ++q)
        if (valid[base + q]) ++sg[q % nc + 1];
      for (int64_t c = 0; c < nc; ++c) sg[c + 1] += sg[c];
      int64_t* fill = next + i * nc;
      std::copy(sg, sg + nc, fill);
      for (int64_t q = 0; q < mi; ++q)
        if (valid[base + q]) cand[base + fill[q % nc]++] = int32_t(q);
      const T* si = score + base;
      for (int64_t c = 0; c < nc; ++c)
        std::stable_sort(cand + base + sg[c], cand + base + sg[c + 1], [&](int32_t a, int32_t z) {
          return detail::desc_key(si[a]) < detail::desc_key(si[z]);
        });
    }
  });

  // Class-aware NMS: every (image, class) segment on its own, in parallel.
  T* soa = ws.soa.as<T>(5 * std::max<int64_t>(m, 1));
  int32_t* ids = ws.order.as<int32_t>(std::max(m, r));   // row_image is no longer needed
  int32_t* kept = ws.kept.as<int32_t>(m);
  uint8_t* flags = ws.flags.as<uint8_t>(m);
  int64_t* nkept = ws.nkept.as<int64_t>(n * nc);
  std::fill(nkept, nkept + n * nc, int64_t(0));
  const T nms_thr = detail::threshold_below(cfg.nms_thresh, T(0));
  parallel_for(0, n * nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t sgi = b; sgi < e; ++sgi) {
      const int64_t i = sgi / nc, c = sgi % nc;
      const int64_t base = start[i] * nc, lo = base + seg[i * (nc + 1) + c], len = seg[i * (nc + 1) + c + 1] -
                                                                                    seg[i * (nc + 1) + c];
      if (len == 0) continue;
      cpu::BoxSpan<T> span{soa + lo, soa + m + lo, soa + 2 * m + lo, soa + 3 * m + lo, soa + 4 * m + lo, ids + lo};
      for (int64_t t = 0; t < len; ++t) {
        const int32_t q = cand[lo + t];
        const T* bx = box + 4 * (base + q);
        span.x1[t] = bx[0], span.y1[t] = bx[1], span.x2[t] = bx[2], span.y2[t] = bx[3];
        span.area[t] = detail::box_area(bx[0], bx[1], bx[2], bx[3]);
        span.id[t] = q;
      }
      nkept[sgi] = cpu::greedy_nms(span, len, nms_thr, d, kept + lo, flags + lo, false);
    }
  });

  // Per image: the kept candidates of all classes in global visiting order (score descending, then candidate
  // order), the best d written out.
  T* ob = dets.boxes.ptr<T>();
  T* os = dets.scores.ptr<T>();
  int64_t* ol = dets.labels.ptr<int64_t>();
  int64_t* oc = dets.counts.ptr<int64_t>();
  parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t base = start[i] * nc;
      const T* si = score + base;
      int32_t* all = cand + base;   // the candidate lists are no longer needed
      int64_t total = 0;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t lo = base + seg[i * (nc + 1) + c];
        std::memmove(all + total, kept + lo, sizeof(int32_t) * nkept[i * nc + c]);
        total += nkept[i * nc + c];
      }
      const int64_t k = std::min(total, d);
      auto before = [&](int32_t a, int32_t z) {
        const Key ka = detail::desc_key(si[a]), kz = detail::desc_key(si[z]);
        return ka != kz ? ka < kz : a < z;
      };
      std::partial_sort(all, all + k, all + total, before);
      for (int64_t t = 0; t < k; ++t) {
        const int32_t q = all[t];
        std::memcpy(ob + 4 * (i * d + t), box + 4 * (base + q), 4 * sizeof(T));
        os[i * d + t] = si[q];
        ol[i * d + t] = q % nc + 1;
      }
      std::fill(ob + 4 * (i * d + k), ob + 4 * (i + 1) * d, T(0));
      std::fill(os + i * d + k, os + (i + 1) * d, T(0));
      std::fill(ol + i * d + k, ol + (i + 1) * d, int64_t(0));
      oc[i] = k;
    }
  });
}

template void select_detections_cpu<float>(const TensorView&, const TensorView&, const TensorView&,
                                           const TensorView&, const TensorView&, const GraphConfig&,
                                           DetectionScratch&, const GraphDetections&);
template void select_detections_cpu<double>(const TensorView&, const TensorView&, const TensorView&,
                                            const TensorView&, const TensorView&, const GraphConfig&,
                                            DetectionScratch&, const GraphDetections&);

}  // namespace mrcnn
