// grid_anchors host entry point: argument checks, the cell anchors (host float32, as torchvision), empty-output
// early return, dispatch to anchors_cpu.cpp or cuda/anchors.cu.
#include <cmath>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/anchors.h"
#include "mrcnn/ops/detail/anchor_math.h"

namespace mrcnn {

void grid_anchors(const float* sizes, int num_sizes, const float* aspect_ratios, int num_ratios, int64_t stride_h,
                  int64_t stride_w, const TensorView& out, Stream stream) {
  MRCNN_CHECK_VALUE(num_sizes > 0, "sizes must not be empty");
  MRCNN_CHECK_VALUE(num_ratios > 0, "aspect_ratios must not be empty");
  const int64_t A = int64_t(num_sizes) * num_ratios;
  MRCNN_CHECK_VALUE(A <= detail::kMaxCellAnchors, "at most ", detail::kMaxCellAnchors,
                    " anchors per location (sizes x aspect_ratios), got ", A);
  for (int i = 0; i < num_sizes; ++i)
    MRCNN_CHECK_VALUE(std::isfinite(sizes[i]) && sizes[i] > 0, "sizes must be positive and finite, got ", sizes[i]);
  for (int i = 0; i < num_ratios; ++i)
    MRCNN_CHECK_VALUE(std::isfinite(aspect_ratios[i]) && aspect_ratios[i] > 0,
                      "aspect_ratios must be positive and finite, got ", aspect_ratios[i]);
  MRCNN_CHECK_VALUE(stride_h > 0 && stride_w > 0, "strides must be positive, got (", stride_h, ", ", stride_w, ")");
  check_ndim(out, 4, "out");
  MRCNN_CHECK_VALUE(out.size(2) == A && out.size(3) == 4, "out must have shape [Hf, Wf, ", A, ", 4], got ",
                    out.shape_str());
  check_float(out, "out");
  check_contiguous(out, "out");
  if (out.numel() == 0) return;
  // Ratio-major order, as torchvision's (w_ratios[:, None] * scales[None, :]).view(-1).
  std::vector<float> cells(static_cast<size_t>(4 * A));
  for (int r = 0; r < num_ratios; ++r)
    for (int s = 0; s < num_sizes; ++s) detail::cell_anchor(sizes[s], aspect_ratios[r], &cells[4 * (r * num_sizes + s)]);
  if (out.is_cuda()) {
    MRCNN_IF_CUDA(grid_anchors_cuda(cells.data(), static_cast<int>(A), stride_h, stride_w, out, stream));
  } else {
    grid_anchors_cpu(cells.data(), static_cast<int>(A), stride_h, stride_w, out);
  }
}

}  // namespace mrcnn
