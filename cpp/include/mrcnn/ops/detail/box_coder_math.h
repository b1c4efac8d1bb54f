#pragma once
// Box encoding/decoding (torchvision BoxCoder conventions), clipping and the min-size test, written once
// for the CPU and CUDA kernels. Every step is rounded in the same order as torchvision's tensor ops
// (mul_rn keeps nvcc from fusing into FMAs), so float32 results match it up to exp/log rounding.
#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"
#include "mrcnn/ops/box_coder.h"
#include "mrcnn/ops/detail/box_math.h"

namespace mrcnn {
namespace detail {

// torch.sigmoid: 1 / (1 + exp(-x)).
template <class T> MRCNN_HD T sigmoid(T x) { return T(1) / (T(1) + exp_t(-x)); }

// (wx, wy, ww, wh) and the dw/dh clamp, already converted to the compute type (torch converts Python
// scalars to the tensor dtype before the op, so do we).
template <class T> struct CoderParams {
  T wx, wy, ww, wh, clip;
};
template <class T> CoderParams<T> coder_params(const BoxCoderParams& p) {
  return {T(p.weights[0]), T(p.weights[1]), T(p.weights[2]), T(p.weights[3]), T(p.clip)};
}

// deltas d = (dx, dy, dw, dh) applied to reference box b; out may alias neither.
template <class T> MRCNN_HD void decode_box(const T* d, const T* b, const CoderParams<T>& p, T* out) {
  const T w = b[2] - b[0], h = b[3] - b[1];
  const T cx = b[0] + mul_rn(T(0.5), w), cy = b[1] + mul_rn(T(0.5), h);
  const T dx = d[0] / p.wx, dy = d[1] / p.wy;
  T dw = d[2] / p.ww, dh = d[3] / p.wh;
  // log(1000/16) by default: keeps exp() of a wild delta from overflowing. NaN passes through like
  // torch.clamp.
  dw = dw > p.clip ? p.clip : dw;
  dh = dh > p.clip ? p.clip : dh;
  const T pcx = mul_rn(dx, w) + cx, pcy = mul_rn(dy, h) + cy;
  const T hw = mul_rn(T(0.5), mul_rn(exp_t(dw), w)), hh = mul_rn(T(0.5), mul_rn(exp_t(dh), h));
  out[0] = pcx - hw;
  out[1] = pcy - hh;
  out[2] = pcx + hw;
  out[3] = pcy + hh;
}

// The deltas that decode `ref` (e.g. a matched ground-truth box) from proposal/anchor `p`:
// torchvision.models.detection._utils.encode_boxes.
template <class T> MRCNN_HD void encode_box(const T* ref, const T* prop, const CoderParams<T>& p, T* out) {
  const T ew = prop[2] - prop[0], eh = prop[3] - prop[1];
  const T ecx = prop[0] + mul_rn(T(0.5), ew), ecy = prop[1] + mul_rn(T(0.5), eh);
  const T gw = ref[2] - ref[0], gh = ref[3] - ref[1];
  const T gcx = ref[0] + mul_rn(T(0.5), gw), gcy = ref[1] + mul_rn(T(0.5), gh);
  out[0] = mul_rn(p.wx, gcx - ecx) / ew;
  out[1] = mul_rn(p.wy, gcy - ecy) / eh;
  out[2] = mul_rn(p.ww, log_t(gw / ew));
  out[3] = mul_rn(p.wh, log_t(gh / eh));
}

// torchvision.ops.clip_boxes_to_image on one box, in place: x in [0, width], y in [0, height].
template <class T> MRCNN_HD void clip_box(T* b, T height, T width) {
  b[0] = clamp(b[0], T(0), width);
  b[1] = clamp(b[1], T(0), height);
  b[2] = clamp(b[2], T(0), width);
  b[3] = clamp(b[3], T(0), height);
}

// torchvision.ops.remove_small_boxes keeps a box when both sides are >= min_size (NaN sides fail).
template <class T> MRCNN_HD bool box_big_enough(const T* b, T min_size) {
  return (b[2] - b[0]) >= min_size && (b[3] - b[1]) >= min_size;
}

// The RPN's size test: both sides >= min_size (torchvision's remove_small_boxes); min_size 0: both sides > 0
// (detectron2's nonempty(), the only filter it applies at test time).
template <class T> MRCNN_HD bool proposal_big_enough(const T* b, T min_size) {
  if (min_size > T(0)) return box_big_enough(b, min_size);
  return (b[2] - b[0]) > T(0) && (b[3] - b[1]) > T(0);
}

}  // namespace detail
}  // namespace mrcnn
