// Stage 3's per-element work on the CPU: box and keypoint rescaling, the labelled class's mask probabilities,
// and keypoints from heatmaps (torch's bicubic resize to the box's ceil'd size, then the arg-max).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "graph_cpu.h"
#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/common/simd.h"

namespace mrcnn {

namespace {

bool cpu_has_fma() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return true;
#endif
}

// ---- bicubic resize, torch's upsample_bicubic2d (align_corners=False) ------------------------------------
// torch's CPU kernel is compiled with FMA contraction where the CPU has FMA; Fused mirrors the steps measured
// to be fused there (the source index, the inner products of the cubic coefficients, the accumulation over the
// taps). Its vectorised loops still round some outputs differently, so values agree to float rounding.

template <bool Fused, class T> MRCNN_ALWAYS_INLINE T cubic1(T x, T a) {
  if (Fused) return detail::fma_rn(a + T(2), x, -(a + T(3))) * x * x + T(1);
  return ((a + T(2)) * x - (a + T(3))) * x * x + T(1);
}
template <bool Fused, class T> MRCNN_ALWAYS_INLINE T cubic2(T x, T a) {
  if (Fused) return detail::fma_rn(detail::fma_rn(a, x, -(T(5) * a)), x, T(8) * a) * x - T(4) * a;
  return ((a * x - T(5) * a) * x + T(8) * a) * x - T(4) * a;
}

// The four taps (clamped indices) and weights of every output index of a resize from `in` to `out` samples.
template <bool Fused, class T> MRCNN_ALWAYS_INLINE void cubic_taps(int64_t in, int64_t out, int64_t* idx, T* wt) {
  const T scale = T(in) / T(out);
  const T a = T(-0.75);
  for (int64_t o = 0; o < out; ++o) {
    const T pos = T(o) + T(0.5);
    const T src = Fused ? detail::fma_rn(scale, pos, T(-0.5)) : scale * pos - T(0.5);
    int64_t i0 = std::min(static_cast<int64_t>(floorf(static_cast<float>(src))), in - 1);
    T t = std::min(std::max(src - T(i0), T(0)), T(1));
    wt[4 * o] = cubic2<Fused>(t + T(1), a);
    wt[4 * o + 1] = cubic1<Fused>(t, a);
    wt[4 * o + 2] = cubic1<Fused>(T(1) - t, a);
    wt[4 * o + 3] = cubic2<Fused>(T(1) - t + T(1), a);
    for (int j = 0; j < 4; ++j) idx[4 * o + j] = std::max<int64_t>(std::min<int64_t>(i0 - 1 + j, in - 1), 0);
  }
}

template <bool Fused, class T> MRCNN_ALWAYS_INLINE T taps4(const T* v, const T* w) {
  T acc = v[0] * w[0];
  for (int j = 1; j < 4; ++j) acc = Fused ? detail::fma_rn(v[j], w[j], acc) : acc + v[j] * w[j];
  return acc;
}

// One thread's scratch for detections whose ceil'd box is at most max_w x max_h (carved from one buffer).
struct KeypointScratch {
  int64_t* xi;
  int64_t* yi;
  double* xw;
  double* yw;
  double* rows;
  double* line;
  static int64_t words(int64_t sh, int64_t max_w, int64_t max_h) { return 9 * max_w + 8 * max_h + sh * max_w; }
  KeypointScratch(double* base, int64_t sh, int64_t max_w, int64_t max_h) {
    xi = reinterpret_cast<int64_t*>(base);
    yi = xi + 4 * max_w;
    xw = reinterpret_cast<double*>(yi + 4 * max_h);
    yw = xw + 4 * max_w;
    rows = yw + 4 * max_h;
    line = rows + sh * max_w;
  }
};

// The ceil'd box size heatmaps_to_keypoints resizes to (widths and heights clamped to >= 1).
template <class T> void ceil_box(const T* box, T& bw, T& bh, int64_t& ow, int64_t& oh) {
  bw = std::max(box[2] - box[0], T(1));
  bh = std::max(box[3] - box[1], T(1));
  ow = int64_t(std::ceil(bw));
  oh = int64_t(std::ceil(bh));
}

// One detection: each of its k heatmaps [s_h, s_w] resized to (hc, wc), the first arg-max cell.
// prob: the score is detectron2's spatial softmax probability of the peak, exp(0) / sum(exp(map - peak)) over the
// S x S heatmap (not the resized one); else the resized heatmap's value at the peak.
template <bool Fused, class T>
MRCNN_ALWAYS_INLINE void keypoints_one(const T* maps, int64_t k, int64_t sh, int64_t sw, const T* box, T* xy,
                                       T* score, bool prob, KeypointScratch& s) {
  T bw, bh;
  int64_t ow, oh;
  ceil_box(box, bw, bh, ow, oh);
  T* xw = reinterpret_cast<T*>(s.xw);
  T* yw = reinterpret_cast<T*>(s.yw);
  T* rows = reinterpret_cast<T*>(s.rows);
  T* out = reinterpret_cast<T*>(s.line);
  cubic_taps<Fused>(sw, ow, s.xi, xw);
  cubic_taps<Fused>(sh, oh, s.yi, yw);
  const T sx = bw / T(ow), sy = bh / T(oh);
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* m = maps + kk * sh * sw;
    // Horizontal pass for every source row: the inner sum of torch's kernel, computed once per (row, x).
    for (int64_t y = 0; y < sh; ++y)
      for (int64_t x = 0; x < ow; ++x) {
        const int64_t* ix = s.xi + 4 * x;
        const T v[4] = {m[y * sw + ix[0]], m[y * sw + ix[1]], m[y * sw + ix[2]], m[y * sw + ix[3]]};
        rows[y * ow + x] = taps4<Fused>(v, xw + 4 * x);
      }
    // Vertical pass a row at a time (vectorises over x), then the scan for torch.argmax's first maximum
    // (a NaN counts as the maximum).
    T best = T(0);
    int64_t bx = 0, by = 0;
    bool first = true, nan = false;
    for (int64_t y = 0; y < oh && !nan; ++y) {
      const int64_t* iy = s.yi + 4 * y;
      const T w0 = yw[4 * y], w1 = yw[4 * y + 1], w2 = yw[4 * y + 2], w3 = yw[4 * y + 3];
      const T* __restrict r0 = rows + iy[0] * ow;
      const T* __restrict r1 = rows + iy[1] * ow;
      const T* __restrict r2 = rows + iy[2] * ow;
      const T* __restrict r3 = rows + iy[3] * ow;
      T* __restrict line = out;
      for (int64_t x = 0; x < ow; ++x) {
        if (Fused) {
          line[x] = detail::fma_rn(r3[x], w3, detail::fma_rn(r2[x], w2, detail::fma_rn(r1[x], w1, r0[x] * w0)));
        } else {
          line[x] = r0[x] * w0 + r1[x] * w1 + r2[x] * w2 + r3[x] * w3;
        }
      }
      for (int64_t x = 0; x < ow; ++x) {
        const T val = line[x];
        if (std::isnan(val)) {
          best = val, bx = x, by = y, nan = true;
          break;
        }
        if (first || val > best) best = val, bx = x, by = y, first = false;
      }
    }
    xy[3 * kk] = (T(bx) + T(0.5)) * sx + box[0];
    xy[3 * kk + 1] = (T(by) + T(0.5)) * sy + box[1];
    xy[3 * kk + 2] = T(1);
    if (prob) {
      T sum = T(0);
      for (int64_t i = 0; i < sh * sw; ++i) sum += detail::exp_t(m[i] - best);
      best = T(1) / sum;
    }
    score[kk] = best;
  }
}

template <class T>
MRCNN_X86_FMA_TARGET void keypoints_fused(const T* maps, int64_t k, int64_t sh, int64_t sw, const T* box, T* xy,
                                          T* score, bool prob, KeypointScratch& s) {
  keypoints_one<true>(maps, k, sh, sw, box, xy, score, prob, s);
}
template <class T>
void keypoints_plain(const T* maps, int64_t k, int64_t sh, int64_t sw, const T* box, T* xy, T* score, bool prob,
                     KeypointScratch& s) {
  keypoints_one<false>(maps, k, sh, sw, box, xy, score, prob, s);
}

template <class T> T sigmoid(T x) { return T(1) / (T(1) + detail::exp_t(-x)); }

}  // namespace

void heatmaps_to_keypoints_ws(const TensorView& maps, const TensorView& boxes, const TensorView& xy,
                              const TensorView& scores, bool prob, GraphBuffer& ws) {
  const int64_t d = maps.size(0), k = maps.size(1), sh = maps.size(2), sw = maps.size(3);
  if (d == 0) return;
  const bool fused = cpu_has_fma();
  MRCNN_DISPATCH_CPU_FLOAT(maps.dtype, "heatmaps_to_keypoints", [&] {
    const scalar_t* m = maps.ptr<scalar_t>();
    const scalar_t* b = boxes.ptr<scalar_t>();
    int64_t max_w = 1, max_h = 1;
    for (int64_t i = 0; i < d; ++i) {
      for (int c = 0; c < 4; ++c)
        MRCNN_CHECK_VALUE(std::isfinite(b[4 * i + c]), "keypoint boxes contain NaN or infinite values");
      scalar_t bw, bh;
      int64_t ow, oh;
      ceil_box(b + 4 * i, bw, bh, ow, oh);
      max_w = std::max(max_w, ow), max_h = std::max(max_h, oh);
    }
    // One scratch slot per task; task t takes detections t, t + slots, ...
    const int64_t slots = std::min<int64_t>(d, std::max(get_num_threads(), 1));
    const int64_t words = KeypointScratch::words(sh, max_w, max_h);
    double* base = ws.as<double>(slots * words);
    scalar_t* o = xy.ptr<scalar_t>();
    scalar_t* sc = scores.ptr<scalar_t>();
    parallel_for(0, slots, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        KeypointScratch s(base + t * words, sh, max_w, max_h);
        for (int64_t i = t; i < d; i += slots) {
          if (fused)
            keypoints_fused(m + i * k * sh * sw, k, sh, sw, b + 4 * i, o + 3 * k * i, sc + k * i, prob, s);
          else
            keypoints_plain(m + i * k * sh * sw, k, sh, sw, b + 4 * i, o + 3 * k * i, sc + k * i, prob, s);
        }
      }
    });
  });
}

void heatmaps_to_keypoints_cpu(const TensorView& maps, const TensorView& boxes, const TensorView& xy,
                               const TensorView& scores, bool prob) {
  GraphBuffer ws;
  heatmaps_to_keypoints_ws(maps, boxes, xy, scores, prob, ws);
}

template <class T>
void rescale_boxes_cpu(const TensorView& boxes, const TensorView& counts, const double* hw, const double* hw0,
                       bool clip, T* resized, T* input) {
  const int64_t n = boxes.size(0), d = boxes.size(1);
  const int64_t* cnt = counts.ptr<int64_t>();
  const T* b = boxes.ptr<T>();
  int64_t r = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T rx = T(hw0[2 * i + 1] / hw[2 * i + 1]), ry = T(hw0[2 * i] / hw[2 * i]);
    const T f[4] = {rx, ry, rx, ry};
    const T hi[4] = {T(hw0[2 * i + 1]), T(hw0[2 * i]), T(hw0[2 * i + 1]), T(hw0[2 * i])};
    for (int64_t j = 0; j < cnt[i]; ++j, ++r)
      for (int c = 0; c < 4; ++c) {
        resized[4 * r + c] = b[4 * (i * d + j) + c];
        T v = b[4 * (i * d + j) + c] * f[c];
        if (clip) {  // torch.clamp(min=0, max=side): NaN stays NaN
          v = v < T(0) ? T(0) : v;
          v = v > hi[c] ? hi[c] : v;
        }
        input[4 * r + c] = v;
      }
  }
}

template <class T>
void rescale_keypoints_cpu(const TensorView& counts, const double* hw, const double* hw0, int64_t k, T* xy) {
  const int64_t* cnt = counts.ptr<int64_t>();
  int64_t r = 0;
  for (int64_t i = 0; i < counts.size(0); ++i) {
    const T rx = T(hw0[2 * i + 1] / hw[2 * i + 1]), ry = T(hw0[2 * i] / hw[2 * i]);
    for (int64_t j = 0; j < cnt[i] * k; ++j) {
      xy[3 * (r * k + j)] *= rx;
      xy[3 * (r * k + j) + 1] *= ry;
    }
    r += cnt[i];
  }
}

template <class T>
void mask_probs_cpu(const TensorView& logits, const TensorView& labels, const TensorView& counts, MaskLoss loss,
                    T* probs, GraphBuffer& ws) {
  const int64_t r = logits.size(0), ch = logits.size(1), mm = logits.size(2) * logits.size(3);
  const int64_t n = labels.size(0), d = labels.size(1);
  const bool agnostic = ch <= (loss == MaskLoss::Sigmoid ? 1 : 2);
  // the channel of each valid detection, packed image after image
  int64_t* chan = ws.as<int64_t>(r);
  const int64_t* cnt = counts.ptr<int64_t>();
  const int64_t* lab = labels.ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < n; ++i)
    for (int64_t q = 0; q < cnt[i]; ++q, ++j) {
      const int64_t c = agnostic ? (loss == MaskLoss::Sigmoid ? 0 : 1) : lab[i * d + q];
      MRCNN_CHECK_VALUE(c >= 0 && c < ch, "detection label ", c, " has no mask channel (mask_logits has ", ch,
                        " channels)");
      chan[j] = c;
    }
  const T* x = logits.ptr<T>();
  const T tiny = std::numeric_limits<T>::min();
  parallel_for(0, r, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* xj = x + j * ch * mm;
      T* o = probs + j * mm;
      const int64_t c = chan[j];
      if (loss == MaskLoss::Sigmoid) {
        for (int64_t q = 0; q < mm; ++q) o[q] = sigmoid(xj[c * mm + q]);
        continue;
      }
      // softmax: p_c / (p_c + max_{a != c} p_a), as postprocess.mask_probs; the largest other probability is
      // that of the largest other logit (exp and the division keep the order)
      for (int64_t q = 0; q < mm; ++q) {
        T mx = xj[q], other = -std::numeric_limits<T>::infinity();
        for (int64_t a = 1; a < ch; ++a) mx = std::max(mx, xj[a * mm + q]);
        T sum = T(0);
        for (int64_t a = 0; a < ch; ++a) {
          sum += detail::exp_t(xj[a * mm + q] - mx);
          if (a != c) other = std::max(other, xj[a * mm + q]);
        }
        const T own = detail::exp_t(xj[c * mm + q] - mx) / sum;
        const T best = detail::exp_t(other - mx) / sum;
        o[q] = own / std::max(own + best, tiny);
      }
    }
  });
}

template void rescale_boxes_cpu<float>(const TensorView&, const TensorView&, const double*, const double*, bool,
                                       float*, float*);
template void rescale_boxes_cpu<double>(const TensorView&, const TensorView&, const double*, const double*, bool,
                                        double*, double*);
template void rescale_keypoints_cpu<float>(const TensorView&, const double*, const double*, int64_t, float*);
template void rescale_keypoints_cpu<double>(const TensorView&, const double*, const double*, int64_t, double*);
template void mask_probs_cpu<float>(const TensorView&, const TensorView&, const TensorView&, MaskLoss, float*,
                                    GraphBuffer&);
template void mask_probs_cpu<double>(const TensorView&, const TensorView&, const TensorView&, MaskLoss, double*,
                                     GraphBuffer&);

}  // namespace mrcnn
