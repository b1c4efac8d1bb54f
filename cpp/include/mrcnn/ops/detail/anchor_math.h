#pragma once
// Anchor math shared by the CPU and CUDA kernels, following torchvision's AnchorGenerator bit for bit:
// cell anchors are computed in float32 (torchvision builds them once, in float32 on the CPU, and casts
// them to the feature dtype), h_ratio = sqrt(ar), w_ratio = 1 / h_ratio, half extents w_ratio * size / 2
// and h_ratio * size / 2, rounded half to even (torch.round). The grid adds integer shifts
// (x * stride_w, y * stride_h) in the output dtype.
#include <math.h>
#include <stdint.h>

#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// Keeps the CUDA kernel's by-value parameter block small (128 * 16 bytes).
constexpr int kMaxCellAnchors = 128;

// (x1, y1, x2, y2) of the zero-centred cell anchor for one (size, aspect ratio = h / w) pair.
MRCNN_HD void cell_anchor(float size, float aspect_ratio, float* out) {
  const float h_ratio = sqrtf(aspect_ratio);
  const float w_ratio = 1.0f / h_ratio;
  const float ws = w_ratio * size, hs = h_ratio * size;
  // rintf rounds half to even in the default rounding mode, like torch.round.
  out[0] = rintf(-ws / 2.0f);
  out[1] = rintf(-hs / 2.0f);
  out[2] = rintf(ws / 2.0f);
  out[3] = rintf(hs / 2.0f);
}

// The integer shift of coordinate j (0..3 = x1, y1, x2, y2) at grid cell (x, y).
MRCNN_HD int64_t anchor_shift(int j, int64_t x, int64_t y, int64_t stride_h, int64_t stride_w) {
  return (j & 1) ? y * stride_h : x * stride_w;
}

}  // namespace detail
}  // namespace mrcnn
