// RoIPool host entry points: argument checks, empty-output early return, dispatch to roi_pool_cpu.cpp or
// cuda/roi_pool.cu.
#include <cmath>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/roi_pool.h"

namespace mrcnn {

namespace {

void check_map(const TensorView& t, const char* name) {
  check_map_layout(t, name);
  check_int32_plane(t, name);
}

void check_rois(const TensorView& rois, const TensorView& like, const char* like_name) {
  check_ndim(rois, 2, "rois");
  MRCNN_CHECK_VALUE(rois.size(1) == 5, "rois must have shape [K, 5], got ", rois.shape_str());
  check_dtype(rois, like.dtype, "rois");
  check_same_device(rois, like, "rois", like_name);
  check_contiguous(rois, "rois");
}

void check_pooled(const TensorView& t, DType dtype, int64_t K, int64_t C, const TensorView& like,
                  const char* name) {
  check_ndim(t, 4, name);
  MRCNN_CHECK_VALUE(t.size(0) == K && t.size(1) == C && t.size(2) > 0 && t.size(3) > 0, name,
                    " must have shape [K, C, oh, ow] with K = ", K, ", C = ", C, " and oh, ow > 0, got ",
                    t.shape_str());
  check_dtype(t, dtype, name);
  check_same_device(t, like, name, "rois");
  check_contiguous(t, name);
}

}  // namespace

void roi_pool_forward(const TensorView& input, const TensorView& rois, double spatial_scale, const TensorView& out,
                      const TensorView& argmax, Stream stream) {
  check_map(input, "input");
  check_float(input, "input");
  check_rois(rois, input, "input");
  MRCNN_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, "spatial_scale must be positive and finite, got ",
                    spatial_scale);
  check_pooled(out, input.dtype, rois.size(0), input.size(1), rois, "out");
  check_pooled(argmax, DType::Int32, rois.size(0), input.size(1), rois, "argmax");
  MRCNN_CHECK_VALUE(argmax.size(2) == out.size(2) && argmax.size(3) == out.size(3),
                    "argmax must have out's shape, got ", argmax.shape_str(), " and ", out.shape_str());
  if (out.numel() == 0) return;
  if (input.is_cuda()) {
    MRCNN_IF_CUDA(roi_pool_forward_cuda(input, rois, spatial_scale, out, argmax, stream));
  } else {
    roi_pool_forward_cpu(input, rois, spatial_scale, out, argmax);
  }
}

void roi_pool_backward(const TensorView& grad_output, const TensorView& rois, const TensorView& argmax,
                       const TensorView& grad_input, const TensorView& workspace, Stream stream) {
  check_map(grad_input, "grad_input");
  check_float(grad_output, "grad_output");
  check_dtype(grad_input, grad_output.dtype, "grad_input");
  check_rois(rois, grad_output, "grad_output");
  check_same_device(grad_input, grad_output, "grad_input", "grad_output");
  check_pooled(grad_output, grad_output.dtype, rois.size(0), grad_input.size(1), rois, "grad_output");
  check_pooled(argmax, DType::Int32, rois.size(0), grad_input.size(1), rois, "argmax");
  MRCNN_CHECK_VALUE(argmax.size(2) == grad_output.size(2) && argmax.size(3) == grad_output.size(3),
                    "argmax must have grad_output's shape, got ", argmax.shape_str(), " and ",
                    grad_output.shape_str());
  const bool half = grad_input.dtype == DType::Float16 || grad_input.dtype == DType::BFloat16;
  if (grad_input.is_cuda() && half) {
    check_dtype(workspace, DType::Float32, "workspace");
    check_same_device(workspace, grad_input, "workspace", "grad_input");
    MRCNN_CHECK_VALUE(workspace.ndim == 4 && workspace.size(0) == grad_input.size(0) &&
                          workspace.size(1) == grad_input.size(1) && workspace.size(2) == grad_input.size(2) &&
                          workspace.size(3) == grad_input.size(3),
                      "workspace must have grad_input's shape ", grad_input.shape_str(), ", got ",
                      workspace.shape_str());
    MRCNN_CHECK_VALUE(workspace.is_contiguous() == grad_input.is_contiguous() &&
                          (workspace.is_contiguous() || workspace.is_channels_last()),
                      "workspace must have grad_input's memory layout");
  }
  if (grad_input.numel() == 0) return;
  if (grad_input.is_cuda()) {
    MRCNN_IF_CUDA(roi_pool_backward_cuda(grad_output, rois, argmax, grad_input, workspace, stream));
  } else {
    roi_pool_backward_cpu(grad_output, rois, argmax, grad_input);
  }
}

}  // namespace mrcnn
