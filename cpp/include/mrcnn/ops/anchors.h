#pragma once
// Anchor grids for one feature level, bit-identical to torchvision's AnchorGenerator.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

// Cell anchors: one per (aspect ratio, size) pair, ratio-major, at most kMaxCellAnchors (see anchor_math.h).
// out: [Hf, Wf, A, 4] contiguous (A = num_sizes * num_ratios), (x1, y1, x2, y2) of cell anchor a shifted to
// (x * stride_w, y * stride_h): location-major, anchor-minor, exactly torchvision's order.
// sizes and aspect ratios must be positive and finite; strides positive. CPU: float32/float64; CUDA also
// float16/bfloat16 (computed as torchvision does in that dtype).
void grid_anchors(const float* sizes, int num_sizes, const float* aspect_ratios, int num_ratios, int64_t stride_h,
                  int64_t stride_w, const TensorView& out, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
// cells: [A][4] float32 cell anchors (host memory).
void grid_anchors_cpu(const float* cells, int A, int64_t stride_h, int64_t stride_w, const TensorView& out);
void grid_anchors_cuda(const float* cells, int A, int64_t stride_h, int64_t stride_w, const TensorView& out,
                       Stream stream);

}  // namespace mrcnn
