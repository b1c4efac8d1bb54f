// COCO RLE host entry points: argument checks, then the CPU encoders (rle_cpu.cpp).
#include "mrcnn/common/check.h"
#include "mrcnn/ops/rle.h"

namespace mrcnn {

std::vector<std::string> rle_encode(const TensorView& masks) {
  check_ndim(masks, 3, "masks");
  MRCNN_CHECK_TYPE(masks.dtype == DType::Bool || masks.dtype == DType::UInt8, "masks must be bool or uint8, got ",
                   dtype_name(masks.dtype));
  MRCNN_CHECK_VALUE(!masks.is_cuda(), "rle_encode takes CPU tensors");
  check_contiguous(masks, "masks");
  if (masks.size(0) == 0) return {};
  return rle_encode_cpu(masks);
}

std::vector<std::string> rle_from_crops(const TensorView& crops, const TensorView& windows, int64_t img_h,
                                        int64_t img_w, bool outside) {
  MRCNN_CHECK_VALUE(!crops.is_cuda() && !windows.is_cuda(), "rle_from_crops takes CPU tensors");
  check_ndim(crops, 1, "crops");
  check_dtype(crops, DType::Bool, "crops");
  check_contiguous(crops, "crops");
  check_dtype(windows, DType::Int64, "windows");
  check_contiguous(windows, "windows");
  MRCNN_CHECK_VALUE(windows.ndim == 2 && windows.size(1) == 5, "windows must have shape [N, 5], got ",
                    windows.shape_str());
  const int64_t N = windows.size(0);
  const int64_t* w = windows.ptr<const int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y0 = w[5 * i], x0 = w[5 * i + 1], h = w[5 * i + 2], wd = w[5 * i + 3], off = w[5 * i + 4];
    MRCNN_CHECK_VALUE(h >= 0 && wd >= 0 && y0 >= 0 && x0 >= 0 && y0 + h <= img_h && x0 + wd <= img_w && off >= 0 &&
                          off + h * wd <= crops.numel(),
                      "windows row ", i, " is outside the image or the crops");
  }
  if (N == 0) return {};
  return rle_from_crops_cpu(crops, windows, img_h, img_w, outside);
}

}  // namespace mrcnn
