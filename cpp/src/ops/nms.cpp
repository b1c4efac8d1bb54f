// nms / batched_nms host entry points: argument checks, dispatch to nms_cpu.cpp or cuda/nms.cu (which also
// handle empty input: keep and count are always written).
#include <cmath>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/nms.h"

namespace mrcnn {
namespace {

void check_nms_args(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
                    const TensorView& keep, const TensorView& count, const TensorView& workspace) {
  check_ndim(boxes, 2, "boxes");
  MRCNN_CHECK_VALUE(boxes.size(1) == 4, "boxes must have shape [N, 4], got ", boxes.shape_str());
  check_float(boxes, "boxes");
  check_ndim(scores, 1, "scores");
  MRCNN_CHECK_VALUE(scores.size(0) == boxes.size(0), "scores must have shape [N] with N = boxes.size(0) = ",
                    boxes.size(0), ", got ", scores.shape_str());
  check_dtype(scores, boxes.dtype, "scores");
  check_same_device(boxes, scores, "boxes", "scores");
  check_contiguous(boxes, "boxes");
  check_contiguous(scores, "scores");
  if (idxs) {
    check_ndim(*idxs, 1, "idxs");
    MRCNN_CHECK_VALUE(idxs->size(0) == boxes.size(0), "idxs must have shape [N] with N = boxes.size(0) = ",
                      boxes.size(0), ", got ", idxs->shape_str());
    check_dtype(*idxs, DType::Int64, "idxs");
    check_same_device(boxes, *idxs, "boxes", "idxs");
    check_contiguous(*idxs, "idxs");
  }
  MRCNN_CHECK_VALUE(!std::isnan(iou_threshold), "iou_threshold must not be NaN");
  MRCNN_CHECK_VALUE(boxes.size(0) < (int64_t(1) << 31), "at most 2^31 - 1 boxes are supported, got ",
                    boxes.size(0));
  check_ndim(keep, 1, "keep");
  check_dtype(keep, DType::Int64, "keep");
  check_same_device(boxes, keep, "boxes", "keep");
  check_contiguous(keep, "keep");
  MRCNN_CHECK_VALUE(count.numel() == 1 && count.ndim <= 1, "count must have a single element, got shape ",
                    count.shape_str());
  check_dtype(count, DType::Int64, "count");
  check_same_device(boxes, count, "boxes", "count");
  if (boxes.is_cuda()) {
    check_workspace(workspace, nms_workspace_bytes(boxes.size(0), boxes.dtype, boxes.device, idxs != nullptr), boxes,
                    "boxes");
  }
}

void run_nms(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
             const TensorView& keep, const TensorView& count, const TensorView& workspace, Stream stream) {
  check_nms_args(boxes, scores, idxs, iou_threshold, keep, count, workspace);
  if (boxes.is_cuda()) {
    MRCNN_IF_CUDA(nms_cuda(boxes, scores, idxs, iou_threshold, keep, count, workspace, stream));
  } else {
    nms_cpu(boxes, scores, idxs, iou_threshold, keep, count);
  }
}

}  // namespace

// dtype and batched matter only to the CUDA path (unused without it).
int64_t nms_workspace_bytes(int64_t n, [[maybe_unused]] DType dtype, DeviceType device, [[maybe_unused]] bool batched) {
  if (device != DeviceType::CUDA || n <= 0) return 0;
#ifdef MRCNN_WITH_CUDA
  return nms_cuda_workspace_bytes(n, dtype, batched);
#else
  return 0;
#endif
}

void nms(const TensorView& boxes, const TensorView& scores, double iou_threshold, const TensorView& keep,
         const TensorView& count, const TensorView& workspace, Stream stream) {
  run_nms(boxes, scores, nullptr, iou_threshold, keep, count, workspace, stream);
}

void batched_nms(const TensorView& boxes, const TensorView& scores, const TensorView& idxs, double iou_threshold,
                 const TensorView& keep, const TensorView& count, const TensorView& workspace, Stream stream) {
  run_nms(boxes, scores, &idxs, iou_threshold, keep, count, workspace, stream);
}

}  // namespace mrcnn
