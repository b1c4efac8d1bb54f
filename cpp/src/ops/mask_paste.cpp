// Mask paste host entry points: argument checks, empty-input early return, dispatch to the CPU kernels
// (mask_paste_cpu.cpp) or the CUDA kernels (cuda/mask_paste.cu).
#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/mask_paste.h"

namespace mrcnn {
namespace {

void check_masks_boxes(const TensorView& masks, const TensorView& boxes, int64_t padding) {
  check_ndim(masks, 3, "masks");
  check_float(masks, "masks");
  check_contiguous(masks, "masks");
  MRCNN_CHECK_VALUE(masks.size(1) > 0 && masks.size(2) > 0, "masks must have non-empty spatial dims, got ",
                    masks.shape_str());
  MRCNN_CHECK_VALUE(padding >= 0, "padding must be >= 0, got ", padding);
  MRCNN_CHECK_VALUE(masks.size(1) + 2 * padding < (int64_t(1) << 30) && masks.size(2) + 2 * padding < (int64_t(1) << 30),
                    "masks are too large (", masks.shape_str(), ", padding ", padding, ")");
  check_ndim(boxes, 2, "boxes");
  MRCNN_CHECK_VALUE(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.shape_str());
  MRCNN_CHECK_TYPE(boxes.dtype == DType::Float32 || boxes.dtype == DType::Float64,
                   "boxes must be float32 or float64, got ", dtype_name(boxes.dtype));
  check_contiguous(boxes, "boxes");
  check_same_device(masks, boxes, "masks", "boxes");
  MRCNN_CHECK_VALUE(boxes.size(0) == masks.size(0), "boxes and masks must have the same length, got ",
                    boxes.size(0), " boxes and ", masks.size(0), " masks");
}

void check_out(const TensorView& out, const TensorView& masks, DType dtype, const char* what) {
  check_ndim(out, 3, "out");
  check_dtype(out, dtype, "out");
  check_same_device(masks, out, "masks", "out");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.size(0) == masks.size(0), "out must have shape [N, H, W] with N = ", masks.size(0),
                    ", got ", out.shape_str(), " (", what, ")");
}

}  // namespace

void paste_masks(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                 bool aligned, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  check_out(out, masks, masks.dtype, "paste_masks");
  if (out.numel() == 0) return;
  if (masks.is_cuda()) {
    MRCNN_IF_CUDA(paste_masks_cuda(masks, boxes, out, padding, aligned, stream));
  } else {
    paste_masks_cpu(masks, boxes, out, padding, aligned);
  }
}

void paste_masks_binary(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                        bool aligned, double threshold, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  check_out(out, masks, DType::Bool, "paste_masks_binary");
  if (out.numel() == 0) return;
  if (masks.is_cuda()) {
    MRCNN_IF_CUDA(paste_masks_binary_cuda(masks, boxes, out, padding, aligned, threshold, stream));
  } else {
    paste_masks_binary_cpu(masks, boxes, out, padding, aligned, threshold);
  }
}

std::vector<std::string> paste_masks_rle(const TensorView& masks, const TensorView& boxes, int64_t img_h,
                                         int64_t img_w, int64_t padding, bool aligned, double threshold) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(!masks.is_cuda(), "paste_masks_rle takes CPU tensors (CUDA: paste_masks_crops + rle_from_crops)");
  MRCNN_CHECK_VALUE(img_h > 0 && img_w > 0, "img_shape must be positive, got (", img_h, ", ", img_w, ")");
  if (masks.size(0) == 0) return {};
  return paste_masks_rle_cpu(masks, boxes, img_h, img_w, padding, aligned, threshold);
}

int64_t paste_masks_windows(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding, bool aligned,
                            int64_t img_h, int64_t img_w, const TensorView& windows) {
  check_ndim(boxes, 2, "boxes");
  MRCNN_CHECK_VALUE(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.shape_str());
  MRCNN_CHECK_TYPE(boxes.dtype == DType::Float32 || boxes.dtype == DType::Float64,
                   "boxes must be float32 or float64, got ", dtype_name(boxes.dtype));
  MRCNN_CHECK_VALUE(!boxes.is_cuda() && !windows.is_cuda(), "paste_masks_windows takes CPU tensors");
  check_contiguous(boxes, "boxes");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(0) == boxes.size(0) && windows.size(1) == 5,
                    "windows must have shape [N, 5], got ", windows.shape_str());
  MRCNN_CHECK_VALUE(mask_h > 0 && mask_w > 0 && padding >= 0 && img_h > 0 && img_w > 0,
                    "bad mask size, padding or image size");
  if (boxes.size(0) == 0) return 0;
  return paste_masks_windows_cpu(boxes, mask_h, mask_w, padding, aligned, img_h, img_w, windows);
}

void paste_masks_crops(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                       const TensorView& crops, int64_t padding, bool aligned, double threshold, int64_t img_h,
                       int64_t img_w, Stream stream) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(masks.is_cuda(), "paste_masks_crops takes CUDA tensors (CPU: paste_masks_rle)");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  check_same_device(masks, windows, "masks", "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(0) == masks.size(0) && windows.size(1) == 5,
                    "windows must have shape [N, 5], got ", windows.shape_str());
  check_ndim(crops, 1, "crops");
  check_dtype(crops, DType::Bool, "crops");
  check_same_device(masks, crops, "masks", "crops");
  if (masks.size(0) == 0 || crops.numel() == 0) return;
  MRCNN_IF_CUDA(
      paste_masks_crops_cuda(masks, boxes, windows, crops, padding, aligned, threshold, img_h, img_w, stream));
}

void paste_masks_pixelwise(const TensorView& masks, const TensorView& boxes, const TensorView* windows,
                           const TensorView& out, int64_t padding, bool aligned, double threshold, bool binary,
                           int64_t img_h, int64_t img_w) {
  check_masks_boxes(masks, boxes, padding);
  MRCNN_CHECK_VALUE(!masks.is_cuda() && !out.is_cuda(), "paste_masks_pixelwise takes CPU tensors");
  MRCNN_CHECK_VALUE(img_h > 0 && img_w > 0, "img_shape must be positive");
  check_contiguous(out, "out");
  if (windows) {
    check_dtype(*windows, DType::Int64, "windows");
    check_contiguous(*windows, "windows");
    MRCNN_CHECK_VALUE(windows->ndim == 2 && windows->size(0) == masks.size(0) && windows->size(1) == 5,
                      "windows must have shape [N, 5]");
    MRCNN_CHECK_VALUE(binary && out.dtype == DType::Bool && out.ndim == 1, "crops must be a 1-D bool tensor");
  } else {
    check_out(out, masks, binary ? DType::Bool : masks.dtype, "paste_masks_pixelwise");
    MRCNN_CHECK_VALUE(out.size(1) == img_h && out.size(2) == img_w, "out must have shape [N, img_h, img_w]");
  }
  if (masks.size(0) == 0) return;
  paste_masks_pixelwise_cpu(masks, boxes, windows, out, padding, aligned, threshold, binary, img_h, img_w);
}

}  // namespace mrcnn
