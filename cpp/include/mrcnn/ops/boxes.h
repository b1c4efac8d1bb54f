#pragma once
// Pairwise box IoU.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

// boxes1: [N, 4], boxes2: [M, 4], out: [N, M], all of one floating dtype on one device (contiguous).
void box_iou(const TensorView& boxes1, const TensorView& boxes2, const TensorView& out, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
void box_iou_cpu(const TensorView& boxes1, const TensorView& boxes2, const TensorView& out);
void box_iou_cuda(const TensorView& boxes1, const TensorView& boxes2, const TensorView& out, Stream stream);

}  // namespace mrcnn
