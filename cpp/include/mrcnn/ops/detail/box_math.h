#pragma once
// Box geometry shared by CPU and CUDA code. Boxes are (x1, y1, x2, y2) in continuous coordinates
// (torchvision's convention: area = (x2 - x1) * (y2 - y1), no +1).
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

template <class T> MRCNN_HD T box_area(T x1, T y1, T x2, T y2) { return (x2 - x1) * (y2 - y1); }

// IoU exactly as torchvision.ops.box_iou: inter / (area_a + area_b - inter); 0/0 gives NaN.
template <class T> MRCNN_HD T box_iou(const T* a, const T* b) {
  const T lt_x = a[0] > b[0] ? a[0] : b[0];
  const T lt_y = a[1] > b[1] ? a[1] : b[1];
  const T rb_x = a[2] < b[2] ? a[2] : b[2];
  const T rb_y = a[3] < b[3] ? a[3] : b[3];
  T w = rb_x - lt_x, h = rb_y - lt_y;
  w = w > T(0) ? w : T(0);
  h = h > T(0) ? h : T(0);
  const T inter = w * h;
  const T uni = box_area(a[0], a[1], a[2], a[3]) + box_area(b[0], b[1], b[2], b[3]) - inter;
  return inter / uni;
}

}  // namespace detail
}  // namespace mrcnn
