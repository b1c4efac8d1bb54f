// box_iou host entry point: argument checks, empty-input early return, dispatch to boxes_cpu.cpp or
// cuda/boxes.cu.
#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/boxes.h"

namespace mrcnn {

void box_iou(const TensorView& b1, const TensorView& b2, const TensorView& out, Stream stream) {
  check_ndim(b1, 2, "boxes1");
  check_ndim(b2, 2, "boxes2");
  MRCNN_CHECK_VALUE(b1.size(1) == 4, "boxes1 must have shape [N, 4], got ", b1.shape_str());
  MRCNN_CHECK_VALUE(b2.size(1) == 4, "boxes2 must have shape [M, 4], got ", b2.shape_str());
  check_float(b1, "boxes1");
  check_dtype(b2, b1.dtype, "boxes2");
  check_dtype(out, b1.dtype, "out");
  check_same_device(b1, b2, "boxes1", "boxes2");
  check_same_device(b1, out, "boxes1", "out");
  check_contiguous(b1, "boxes1");
  check_contiguous(b2, "boxes2");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.ndim == 2 && out.size(0) == b1.size(0) && out.size(1) == b2.size(0),
                    "out must have shape [N, M], got ", out.shape_str());
  if (out.numel() == 0) return;
  if (b1.is_cuda()) {
    MRCNN_IF_CUDA(box_iou_cuda(b1, b2, out, stream));
  } else {
    box_iou_cpu(b1, b2, out);
  }
}

}  // namespace mrcnn
