// RoIAlign / RoIWarp / multi-level RoIAlign host entry points: argument checks, empty-output early return
// (forward; the backward always writes the gradient), dispatch to roi_align_cpu.cpp or cuda/roi_align.cu.
#include <cmath>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/roi_align.h"

namespace mrcnn {
namespace {

DType roi_dtype_for(DType feat) { return feat == DType::Float64 ? DType::Float64 : DType::Float32; }

void check_options(const RoiAlignOptions& opt) {
  MRCNN_CHECK_VALUE(opt.pooled_h > 0 && opt.pooled_w > 0 && opt.pooled_h <= (1 << 20) && opt.pooled_w <= (1 << 20),
                    "output_size must be positive, got (", opt.pooled_h, ", ", opt.pooled_w, ")");
}

void check_levels(const TensorView* features, const double* scales, int L, RoiLevels& lv, const char* name) {
  MRCNN_CHECK_VALUE(L >= 1 && L <= kMaxRoiLevels, name, ": expected 1 to ", kMaxRoiLevels, " feature levels, got ", L);
  const TensorView& f0 = features[0];
  bool nchw = true, cl = true;
  for (int l = 0; l < L; ++l) {
    const TensorView& f = features[l];
    MRCNN_CHECK_VALUE(f.ndim == 4, name, "[", l, "] must be a 4-D tensor [N, C, H, W], got shape ", f.shape_str());
    check_float(f, name);
    MRCNN_CHECK_TYPE(f.dtype == f0.dtype, name, "[", l, "] has dtype ", dtype_name(f.dtype), ", expected ",
                     dtype_name(f0.dtype), " like ", name, "[0]");
    check_same_device(f, f0, name, name);
    MRCNN_CHECK_VALUE(f.size(0) == f0.size(0) && f.size(1) == f0.size(1), name, "[", l, "] has shape ",
                      f.shape_str(), ", expected the batch size and channels of ", name, "[0] ", f0.shape_str());
    MRCNN_CHECK_VALUE(f.size(2) < (int64_t(1) << 31) && f.size(3) < (int64_t(1) << 31), name, "[", l,
                      "] is too large");
    MRCNN_CHECK_VALUE(std::isfinite(scales[l]) && scales[l] > 0, "spatial_scale for level ", l,
                      " must be a positive finite number, got ", scales[l]);
    nchw = nchw && f.is_contiguous();
    cl = cl && f.is_channels_last();
    lv.feat[l] = f;
    lv.scale[l] = scales[l];
  }
  MRCNN_CHECK_VALUE(nchw || cl, name, " must be NCHW-contiguous or channels-last (all levels alike)");
  lv.count = L;
}

void check_rois(const TensorView& rois, const TensorView& f0) {
  MRCNN_CHECK_VALUE(rois.ndim == 2 && rois.size(1) == 5, "rois must have shape [K, 5], got ", rois.shape_str());
  check_same_device(rois, f0, "rois", "input");
  MRCNN_CHECK_TYPE(rois.dtype == roi_dtype_for(f0.dtype), "rois must have dtype ",
                   dtype_name(roi_dtype_for(f0.dtype)), " for ", dtype_name(f0.dtype), " features, got ",
                   dtype_name(rois.dtype));
  check_contiguous(rois, "rois");
}

void check_pooled(const TensorView& t, const TensorView& f0, const TensorView& rois, const RoiAlignOptions& opt,
                  const char* name) {
  MRCNN_CHECK_VALUE(t.ndim == 4 && t.size(0) == rois.size(0) && t.size(1) == f0.size(1) && t.size(2) == opt.pooled_h &&
                        t.size(3) == opt.pooled_w,
                    name, " must have shape [K, C, pooled_h, pooled_w] = [", rois.size(0), ", ", f0.size(1), ", ",
                    opt.pooled_h, ", ", opt.pooled_w, "], got ", t.shape_str());
  check_dtype(t, f0.dtype, name);
  check_same_device(t, f0, name, "input");
}

void check_grads(const TensorView* grads, RoiLevels& lv, const char* name) {
  for (int l = 0; l < lv.count; ++l) {
    const TensorView& g = grads[l];
    const TensorView& f = lv.feat[l];
    const DType want = (f.is_cuda() && (f.dtype == DType::Float16 || f.dtype == DType::BFloat16)) ? DType::Float32
                                                                                                     : f.dtype;
    MRCNN_CHECK_TYPE(g.dtype == want, name, "[", l, "] must have dtype ", dtype_name(want), " for ",
                     dtype_name(f.dtype), " features, got ", dtype_name(g.dtype));
    check_same_device(g, f, name, "input");
    bool same = g.ndim == 4;
    for (int d = 0; same && d < 4; ++d) same = g.size(d) == f.size(d) && (f.size(d) == 1 || g.stride(d) == f.stride(d));
    MRCNN_CHECK_VALUE(same, name, "[", l, "] must have the shape and strides of the features, got ", g.shape_str());
    lv.grad[l] = g;
  }
}

void forward_dispatch(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map, const RoiAlignOptions& opt,
                      const TensorView& out, Stream stream) {
  if (out.numel() == 0) return;
  if (lv.feat[0].is_cuda()) {
    MRCNN_IF_CUDA(roi_align_forward_cuda(lv, rois, map, opt, out, stream));
  } else {
    roi_align_forward_cpu(lv, rois, map, opt, out);
  }
}

void backward_dispatch(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois,
                       const FpnLevelMap* map, const RoiAlignOptions& opt, Stream stream) {
  // Even with no RoIs the gradient must be written (zeros): the core owns zero-filling it.
  if (lv.feat[0].is_cuda()) {
    MRCNN_IF_CUDA(roi_align_backward_cuda(grad_out, lv, rois, map, opt, stream));
  } else {
    roi_align_backward_cpu(grad_out, lv, rois, map, opt);
  }
}

}  // namespace

void roi_align_forward(const TensorView& input, const TensorView& rois, double spatial_scale,
                       const RoiAlignOptions& opt, const TensorView& out, Stream stream) {
  check_options(opt);
  RoiLevels lv;
  check_levels(&input, &spatial_scale, 1, lv, "input");
  check_rois(rois, input);
  check_pooled(out, input, rois, opt, "out");
  forward_dispatch(lv, rois, nullptr, opt, out, stream);
}

void roi_align_backward(const TensorView& grad_out, const TensorView& input, const TensorView& rois,
                        double spatial_scale, const RoiAlignOptions& opt, const TensorView& grad_input,
                        Stream stream) {
  check_options(opt);
  RoiLevels lv;
  check_levels(&input, &spatial_scale, 1, lv, "input");
  check_rois(rois, input);
  check_pooled(grad_out, input, rois, opt, "grad_out");
  check_grads(&grad_input, lv, "grad_input");
  backward_dispatch(grad_out, lv, rois, nullptr, opt, stream);
}

void multilevel_roi_align_forward(const TensorView* features, const double* spatial_scales, int num_levels,
                                  const TensorView& rois, const FpnLevelMap& map, const RoiAlignOptions& opt,
                                  const TensorView& out, Stream stream) {
  check_options(opt);
  RoiLevels lv;
  check_levels(features, spatial_scales, num_levels, lv, "features");
  check_rois(rois, features[0]);
  check_pooled(out, features[0], rois, opt, "out");
  forward_dispatch(lv, rois, &map, opt, out, stream);
}

void multilevel_roi_align_backward(const TensorView& grad_out, const TensorView* features,
                                   const TensorView* grad_features, const double* spatial_scales,
                                   int num_levels, const TensorView& rois, const FpnLevelMap& map,
                                   const RoiAlignOptions& opt, Stream stream) {
  check_options(opt);
  RoiLevels lv;
  check_levels(features, spatial_scales, num_levels, lv, "features");
  check_rois(rois, features[0]);
  check_pooled(grad_out, features[0], rois, opt, "grad_out");
  check_grads(grad_features, lv, "grad_features");
  backward_dispatch(grad_out, lv, rois, &map, opt, stream);
}

void fpn_level_assign(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels, Stream stream) {
  MRCNN_CHECK_VALUE(boxes.ndim == 2 && (boxes.size(1) == 4 || boxes.size(1) == 5),
                    "boxes must have shape [K, 4] or [K, 5], got ", boxes.shape_str());
  MRCNN_CHECK_TYPE(boxes.dtype == DType::Float32 || boxes.dtype == DType::Float64,
                   "boxes must have dtype float32 or float64, got ", dtype_name(boxes.dtype));
  check_contiguous(boxes, "boxes");
  MRCNN_CHECK_VALUE(levels.ndim == 1 && levels.size(0) == boxes.size(0), "levels must have shape [K], got ",
                    levels.shape_str());
  check_dtype(levels, DType::Int64, "levels");
  check_contiguous(levels, "levels");
  check_same_device(boxes, levels, "boxes", "levels");
  MRCNN_CHECK_VALUE(std::isfinite(map.canonical_scale) && map.canonical_scale > 0,
                    "canonical_scale must be positive, got ", map.canonical_scale);
  if (boxes.size(0) == 0) return;
  if (boxes.is_cuda()) {
    MRCNN_IF_CUDA(fpn_level_assign_cuda(boxes, map, levels, stream));
  } else {
    fpn_level_assign_cpu(boxes, map, levels);
  }
}

}  // namespace mrcnn
