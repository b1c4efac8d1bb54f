#pragma once
// RoIPool (Fast R-CNN max pooling over RoI bins), torchvision.ops.roi_pool semantics.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

// input: [N, C, H, W], NCHW-contiguous or channels-last (read in place, no copy).
// rois: [K, 5] contiguous (batch_index, x1, y1, x2, y2), same dtype and device as input.
// out: [K, C, oh, ow] contiguous, input's dtype. argmax: [K, C, oh, ow] contiguous int32, the arg-max as
// h * W + w inside the RoI's feature plane, or -1 for an empty bin (whose output is 0).
// A RoI whose batch index is not in [0, N) (or NaN) pools to zeros with arg-max -1; callers that want an
// error validate first (the Python wrapper does).
void roi_pool_forward(const TensorView& input, const TensorView& rois, double spatial_scale, const TensorView& out,
                      const TensorView& argmax, Stream stream);

// grad_output: [K, C, oh, ow] contiguous; rois, argmax: as saved by the forward.
// grad_input: [N, C, H, W] NCHW-contiguous or channels-last, grad_output's dtype; fully overwritten.
// workspace: a float32 tensor with grad_input's shape and layout, needed only for float16/bfloat16 on CUDA
// (atomics accumulate in float32 there); pass an empty view otherwise.
// The CPU path is deterministic: each thread owns whole (batch, channel) planes and adds RoIs in order.
void roi_pool_backward(const TensorView& grad_output, const TensorView& rois, const TensorView& argmax,
                       const TensorView& grad_input, const TensorView& workspace, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
void roi_pool_forward_cpu(const TensorView& input, const TensorView& rois, double spatial_scale,
                          const TensorView& out, const TensorView& argmax);
void roi_pool_backward_cpu(const TensorView& grad_output, const TensorView& rois, const TensorView& argmax,
                           const TensorView& grad_input);
void roi_pool_forward_cuda(const TensorView& input, const TensorView& rois, double spatial_scale,
                           const TensorView& out, const TensorView& argmax, Stream stream);
void roi_pool_backward_cuda(const TensorView& grad_output, const TensorView& rois, const TensorView& argmax,
                            const TensorView& grad_input, const TensorView& workspace, Stream stream);

}  // namespace mrcnn
