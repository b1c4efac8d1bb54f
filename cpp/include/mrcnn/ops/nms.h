#pragma once
// Greedy non-maximum suppression with torchvision.ops.nms / batched_nms semantics:
//  - boxes are (x1, y1, x2, y2) in continuous coordinates (no +1);
//  - candidates are visited in a STABLE descending sort of the scores (ties keep input order);
//  - box j is suppressed by a kept box i when IoU(i, j) > iou_threshold (strict; a NaN IoU from two
//    zero-area boxes suppresses nothing); the IoU is computed in the box dtype and compared with the
//    double threshold exactly as torchvision's CPU kernel does;
//  - the kept indices come out in that visiting order (descending score).
// batched_nms only lets boxes with equal idxs suppress each other (computed on the original
// coordinates: no coordinate-offset trick and its rounding).
//
// Outputs have a fixed capacity so the CUDA path never waits for the device: keep[0:count] holds the
// kept indices, keep[count:] is -1, and at most keep.size(0) boxes are kept (the highest scoring, as
// if the result were truncated).
#include <cstdint>

#include "mrcnn/common/tensor.h"

namespace mrcnn {

// Bytes of device scratch (the `workspace` argument) that nms/batched_nms need for n boxes on CUDA;
// 0 on CPU, which manages its own scratch.
int64_t nms_workspace_bytes(int64_t n, DType dtype, DeviceType device, bool batched);

// boxes: [N, 4] float, scores: [N] same dtype, keep: [max_out] int64, count: int64 with one element
// (shape [] or [1]), workspace: uint8 [nms_workspace_bytes(...)] on the same device (ignored on CPU).
// CPU inputs with NaN/inf boxes or scores raise ValueError; the CUDA path does not inspect values
// (it stays asynchronous) and gives unspecified but memory-safe results for them.
void nms(const TensorView& boxes, const TensorView& scores, double iou_threshold, const TensorView& keep,
         const TensorView& count, const TensorView& workspace, Stream stream);
// idxs: [N] int64 category of every box.
void batched_nms(const TensorView& boxes, const TensorView& scores, const TensorView& idxs, double iou_threshold,
                 const TensorView& keep, const TensorView& count, const TensorView& workspace, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
// idxs == nullptr for plain NMS.
void nms_cpu(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
             const TensorView& keep, const TensorView& count);
void nms_cuda(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
              const TensorView& keep, const TensorView& count, const TensorView& workspace, Stream stream);
int64_t nms_cuda_workspace_bytes(int64_t n, DType dtype, bool batched);

}  // namespace mrcnn
