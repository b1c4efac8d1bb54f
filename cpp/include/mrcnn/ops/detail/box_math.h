#pragma once
// Box geometry shared by CPU and CUDA code. Boxes are (x1, y1, x2, y2) in continuous coordinates
// (torchvision's convention: area = (x2 - x1) * (y2 - y1), no +1).
#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

template <class T> MRCNN_HD T box_area(T x1, T y1, T x2, T y2) { return mul_rn(x2 - x1, y2 - y1); }

// IoU of box a and box b given their precomputed areas, in exactly the operation order of
// torchvision's NMS kernel: inter / ((area_a + area_b) - inter). Written branch-free (selects only)
// so the CPU loops over b vectorise.
template <class T>
MRCNN_HD T box_iou_parts(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  const T lt_x = ax1 > bx1 ? ax1 : bx1;
  const T lt_y = ay1 > by1 ? ay1 : by1;
  const T rb_x = ax2 < bx2 ? ax2 : bx2;
  const T rb_y = ay2 < by2 ? ay2 : by2;
  T w = rb_x - lt_x, h = rb_y - lt_y;
  w = w > T(0) ? w : T(0);
  h = h > T(0) ? h : T(0);
  const T inter = mul_rn(w, h);
  return inter / (area_a + area_b - inter);
}

// IoU exactly as torchvision.ops.box_iou: inter / (area_a + area_b - inter); 0/0 gives NaN.
template <class T> MRCNN_HD T box_iou(const T* a, const T* b) {
  return box_iou_parts(a[0], a[1], a[2], a[3], box_area(a[0], a[1], a[2], a[3]),  //
                       b[0], b[1], b[2], b[3], box_area(b[0], b[1], b[2], b[3]));
}

}  // namespace detail
}  // namespace mrcnn
