// RPN proposals on the CPU: per (image, level) top-k, decode, clip, filter and NMS, then a merge per image.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/detail/box_coder_math.h"
#include "mrcnn/ops/detail/box_math.h"
#include "mrcnn/ops/detail/nms_math.h"
#include "mrcnn/ops/proposals.h"
#include "nms_cpu.h"

namespace mrcnn {
namespace {

// Positions of the k largest of v[0..n), ordered by (value descending, position ascending): torch's
// topk order with ties broken by position. A strided sample estimates a value threshold that a little
// more than k elements reach; one vectorised pass collects those (a few thousand of ~200k anchors) and
// only they are sorted. If the estimate was too high (rare), everything is collected.
// Returns false if v holds NaN or inf.
template <class T> bool select_top(const T* v, int64_t n, int64_t k, int32_t* out) {
  using Key = decltype(detail::desc_key(T(0)));
  T thr = -std::numeric_limits<T>::infinity();
  if (n > 16384 && k < n / 8) {
    constexpr int64_t kStride = 61;  // odd, so it does not alias with the anchor count per location
    std::vector<T> sample;
    sample.reserve(n / kStride + 1);
    for (int64_t i = 0; i < n; i += kStride)
      if (!detail::non_finite(v[i])) sample.push_back(v[i]);
    const int64_t ns = static_cast<int64_t>(sample.size());
    // Twice the expected rank of the k-th largest, plus slack for small k.
    const int64_t want = std::min<int64_t>(ns, 2 * k * ns / n + 16);
    if (want > 0 && want < ns) {
      std::nth_element(sample.begin(), sample.begin() + (want - 1), sample.end(), std::greater<T>());
      thr = sample[want - 1];
    }
  }
  std::vector<Key> keys, tmp_keys;
  std::vector<int32_t> pos, tmp_pos;
  for (int pass = 0; pass < 2; ++pass) {
    keys.clear();
    pos.clear();
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      bad |= detail::non_finite(v[i]);
      if (v[i] >= thr) {
        keys.push_back(detail::desc_key(v[i]));
        pos.push_back(static_cast<int32_t>(i));
      }
    }
    if (bad) return false;
    if (static_cast<int64_t>(keys.size()) >= k) break;
    thr = -std::numeric_limits<T>::infinity();
  }
  const int64_t m = static_cast<int64_t>(keys.size());
  tmp_keys.resize(m);
  tmp_pos.resize(m);
  cpu::radix_sort_pairs(keys.data(), pos.data(), m, tmp_keys.data(), tmp_pos.data());
  std::copy_n(pos.data(), k, out);
  return true;
}

template <class T> struct LevelResult {
  std::vector<T> boxes;   // [count, 4]
  std::vector<T> scores;  // [count], non-increasing
};

template <class T>
void level_proposals(const ProposalLevel& lv, int64_t img, T height, T width, const ProposalParams& p,
                     LevelResult<T>& res) {
  const int64_t r = lv.objectness.size(1);
  const int64_t k = std::min(p.pre_nms_top_n, r);
  const T* obj = lv.objectness.ptr<T>() + img * r;
  const T* del = lv.deltas.ptr<T>() + img * r * 4;
  const T* anc = lv.anchors.ptr<T>();
  std::vector<int32_t> top(k);
  MRCNN_CHECK_VALUE(select_top(obj, r, k, top.data()), "objectness contains NaN or infinite values");

  const detail::CoderParams<T> cp = detail::coder_params<T>(p.coder);
  // torch compares a float tensor with a Python float after converting the scalar to the tensor dtype.
  const T min_size = T(p.min_size), score_thresh = T(p.score_thresh);
  cpu::BoxStore<T> c;
  c.resize(k);
  std::vector<T> cand_boxes(4 * k), cand_scores(k);
  int64_t m = 0;
  for (int64_t q = 0; q < k; ++q) {
    const int64_t i = top[q];
    const T* a = anc + 4 * i;
    MRCNN_CHECK_VALUE(std::isfinite(a[0]) && std::isfinite(a[1]) && std::isfinite(a[2]) && std::isfinite(a[3]),
                      "anchors contains NaN or infinite values");
    T* bx = cand_boxes.data() + 4 * m;
    detail::decode_box(del + 4 * i, a, cp, bx);
    detail::clip_box(bx, height, width);
    const T score = detail::sigmoid(obj[i]);
    if (!detail::proposal_big_enough(bx, min_size) || !(score >= score_thresh)) continue;
    cand_scores[m] = score;
    c.x1[m] = bx[0], c.y1[m] = bx[1], c.x2[m] = bx[2], c.y2[m] = bx[3];
    c.area[m] = detail::box_area(bx[0], bx[1], bx[2], bx[3]);
    c.id[m] = static_cast<int32_t>(m);
    ++m;
  }
  std::vector<int32_t> kept(m);
  std::vector<uint8_t> flags(m);
  const int64_t nk = cpu::greedy_nms(c.span(), m, detail::threshold_below(p.nms_thresh, T(0)), p.post_nms_top_n,
                                     kept.data(), flags.data(), /*parallel=*/false);
  res.boxes.resize(4 * nk);
  res.scores.resize(nk);
  for (int64_t t = 0; t < nk; ++t) {
    std::copy_n(cand_boxes.data() + 4 * kept[t], 4, res.boxes.data() + 4 * t);
    res.scores[t] = cand_scores[kept[t]];
  }
}

template <class T>
void proposals_cpu_impl(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                        const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                        const TensorView& counts) {
  const int64_t nimg = boxes.size(0), post = boxes.size(1);
  const int64_t nlev = static_cast<int64_t>(levels.size());
  const double* hw = image_sizes.ptr<double>();
  std::vector<LevelResult<T>> res(nimg * nlev);
  // Image-major task order puts the heavy first level of each image in different chunks.
  parallel_for(0, nimg * nlev, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t img = t / nlev, l = t % nlev;
      level_proposals<T>(levels[l], img, T(hw[2 * img]), T(hw[2 * img + 1]), p, res[t]);
    }
  });
  T* ob = boxes.ptr<T>();
  T* os = scores.ptr<T>();
  int64_t* oc = counts.ptr<int64_t>();
  std::vector<int64_t> head(nlev);
  for (int64_t img = 0; img < nimg; ++img) {
    // Merge the per-level lists (each sorted by score) by descending score; ties go to the lower
    // level, as a stable sort of the level-ordered concatenation would do.
    std::fill(head.begin(), head.end(), 0);
    const LevelResult<T>* r = res.data() + img * nlev;
    int64_t out = 0;
    for (; out < post; ++out) {
      int64_t best = -1;
      for (int64_t l = 0; l < nlev; ++l) {
        if (head[l] >= static_cast<int64_t>(r[l].scores.size())) continue;
        if (best < 0 || r[l].scores[head[l]] > r[best].scores[head[best]]) best = l;
      }
      if (best < 0) break;
      std::copy_n(r[best].boxes.data() + 4 * head[best], 4, ob + (img * post + out) * 4);
      os[img * post + out] = r[best].scores[head[best]];
      ++head[best];
    }
    std::fill(ob + (img * post + out) * 4, ob + (img + 1) * post * 4, T(0));
    std::fill(os + img * post + out, os + (img + 1) * post, T(0));
    oc[img] = out;
  }
}

}  // namespace

void generate_proposals_cpu(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                            const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                            const TensorView& counts) {
  const double* hw = image_sizes.ptr<double>();
  for (int64_t i = 0; i < 2 * image_sizes.size(0); ++i)
    MRCNN_CHECK_VALUE(std::isfinite(hw[i]) && hw[i] >= 0, "image_sizes must be finite and non-negative, got ",
                      hw[i]);
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "generate_proposals", [&] {
    proposals_cpu_impl<scalar_t>(levels, image_sizes, p, boxes, scores, counts);
  });
}

}  // namespace mrcnn
