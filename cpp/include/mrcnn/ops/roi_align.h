#pragma once
// RoIAlign (average or max over the bilinear samples of a bin), RoIWarp (corners rounded to the feature
// grid, then RoIAlign's sampling) and multi-level (FPN) RoIAlign, forward and backward.
//
// Features are [N, C, H, W] views stored NCHW-contiguous or channels-last (NHWC), read in place.
// rois are [K, 5] (batch_index, x1, y1, x2, y2) in image coordinates, contiguous, float32 for float16 /
// bfloat16 / float32 features and float64 for float64 features. Outputs may have any strides.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

enum class RoiPoolMode : int { Avg = 0, Max = 1 };

struct RoiAlignOptions {
  int64_t pooled_h = 7, pooled_w = 7;
  int64_t sampling_ratio = -1;  // <= 0: adaptive, ceil(roi size / output size) samples per bin and axis
  bool aligned = false;         // half-pixel offset (RoIAlign as in Detectron2)
  RoiPoolMode mode = RoiPoolMode::Avg;
  bool quantize = false;        // RoIWarp: round the RoI corners on the feature grid first
};

// torchvision LevelMapper: level = floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)
// clamped to [k_min, k_max]; the RoI is pooled from features[level - k_min] (zeros if there is none).
// detectron2: floor(canonical_level + log2(sqrt(area) / canonical_scale + 1e-8)), clamped the same way.
struct FpnLevelMap {
  int k_min = 2, k_max = 5;
  int canonical_level = 4;
  double canonical_scale = 224;
  bool detectron2 = false;
};

constexpr int kMaxRoiLevels = 8;

// out: [K, C, pooled_h, pooled_w], dtype of input.
void roi_align_forward(const TensorView& input, const TensorView& rois, double spatial_scale,
                       const RoiAlignOptions& opt, const TensorView& out, Stream stream);
// grad_input: same shape and strides as input; overwritten (the core zero-fills it). Its dtype is the
// input's, except float32 for float16/bfloat16 input on CUDA (accumulated with float atomics).
void roi_align_backward(const TensorView& grad_out, const TensorView& input, const TensorView& rois,
                        double spatial_scale, const RoiAlignOptions& opt, const TensorView& grad_input,
                        Stream stream);

// features[l]: [N, C, H_l, W_l] (same N, C, dtype, device); one call pools every RoI from its level.
void multilevel_roi_align_forward(const TensorView* features, const double* spatial_scales, int num_levels,
                                  const TensorView& rois, const FpnLevelMap& map, const RoiAlignOptions& opt,
                                  const TensorView& out, Stream stream);
void multilevel_roi_align_backward(const TensorView& grad_out, const TensorView* features,
                                   const TensorView* grad_features, const double* spatial_scales,
                                   int num_levels, const TensorView& rois, const FpnLevelMap& map,
                                   const RoiAlignOptions& opt, Stream stream);

// boxes: [K, 4] (x1, y1, x2, y2) or [K, 5] (batch_index first, ignored), float32/float64, contiguous.
// levels: [K] int64, the 0-based level index (level - k_min).
void fpn_level_assign(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
struct RoiLevels {
  TensorView feat[kMaxRoiLevels];
  TensorView grad[kMaxRoiLevels];  // backward only
  double scale[kMaxRoiLevels];
  int count = 0;
};

// map == nullptr: single level, every RoI pooled from level 0.
void roi_align_forward_cpu(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map,
                           const RoiAlignOptions& opt, const TensorView& out);
void roi_align_backward_cpu(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois,
                            const FpnLevelMap* map, const RoiAlignOptions& opt);
void fpn_level_assign_cpu(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels);

void roi_align_forward_cuda(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map,
                            const RoiAlignOptions& opt, const TensorView& out, Stream stream);
void roi_align_backward_cuda(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois,
                             const FpnLevelMap* map, const RoiAlignOptions& opt, Stream stream);
void fpn_level_assign_cuda(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels,
                           Stream stream);

}  // namespace mrcnn
