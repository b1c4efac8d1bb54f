// Box coder host entry points: argument checks, empty-input early return, dispatch to box_coder_cpu.cpp or
// cuda/box_coder.cu.
#include <cmath>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/box_coder.h"

namespace mrcnn {
namespace {

void check_boxes_arg(const TensorView& t, const char* name) {
  check_ndim(t, 2, name);
  MRCNN_CHECK_VALUE(t.size(1) == 4, name, " must have shape [N, 4], got ", t.shape_str());
  check_float(t, name);
  check_contiguous(t, name);
}

void check_params(const BoxCoderParams& p) {
  check_box_coder_weights(p);
  MRCNN_CHECK_VALUE(!std::isnan(p.clip), "clamp must not be NaN");
}

}  // namespace

void check_box_coder_weights(const BoxCoderParams& p) {
  for (double w : p.weights)
    MRCNN_CHECK_VALUE(std::isfinite(w) && w != 0.0, "weights must be finite and non-zero, got ", w);
}

void encode_boxes(const TensorView& ref, const TensorView& prop, const BoxCoderParams& p, const TensorView& out,
                  Stream stream) {
  check_boxes_arg(ref, "reference_boxes");
  check_boxes_arg(prop, "proposals");
  MRCNN_CHECK_VALUE(prop.size(0) == ref.size(0), "proposals must have as many rows as reference_boxes (",
                    ref.size(0), "), got ", prop.size(0));
  check_dtype(prop, ref.dtype, "proposals");
  check_same_device(ref, prop, "reference_boxes", "proposals");
  check_params(p);
  check_dtype(out, ref.dtype, "out");
  check_same_device(ref, out, "reference_boxes", "out");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.ndim == 2 && out.size(0) == ref.size(0) && out.size(1) == 4,
                    "out must have shape [N, 4], got ", out.shape_str());
  if (ref.size(0) == 0) return;
  if (ref.is_cuda()) {
    MRCNN_IF_CUDA(encode_boxes_cuda(ref, prop, p, out, stream));
  } else {
    encode_boxes_cpu(ref, prop, p, out);
  }
}

void decode_boxes(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p, const TensorView& out,
                  Stream stream) {
  check_boxes_arg(boxes, "boxes");
  check_ndim(deltas, 2, "deltas");
  MRCNN_CHECK_VALUE(deltas.size(1) % 4 == 0 && deltas.size(1) > 0, "deltas must have shape [N, 4 * K], got ",
                    deltas.shape_str());
  MRCNN_CHECK_VALUE(deltas.size(0) == boxes.size(0), "deltas must have as many rows as boxes (", boxes.size(0),
                    "), got ", deltas.size(0));
  check_dtype(deltas, boxes.dtype, "deltas");
  check_same_device(deltas, boxes, "deltas", "boxes");
  check_contiguous(deltas, "deltas");
  check_params(p);
  check_dtype(out, boxes.dtype, "out");
  check_same_device(boxes, out, "boxes", "out");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.ndim == 3 && out.size(0) == boxes.size(0) && out.size(1) == deltas.size(1) / 4 &&
                        out.size(2) == 4,
                    "out must have shape [N, K, 4], got ", out.shape_str());
  if (out.numel() == 0) return;
  if (boxes.is_cuda()) {
    MRCNN_IF_CUDA(decode_boxes_cuda(deltas, boxes, p, out, stream));
  } else {
    decode_boxes_cpu(deltas, boxes, p, out);
  }
}

void clip_boxes(const TensorView& boxes, double height, double width, const TensorView& out, Stream stream) {
  MRCNN_CHECK_VALUE(boxes.ndim >= 1 && boxes.size(-1) == 4, "boxes must have shape [..., 4], got ",
                    boxes.shape_str());
  check_float(boxes, "boxes");
  check_contiguous(boxes, "boxes");
  MRCNN_CHECK_VALUE(std::isfinite(height) && std::isfinite(width) && height >= 0 && width >= 0,
                    "image size must be finite and non-negative, got (", height, ", ", width, ")");
  check_dtype(out, boxes.dtype, "out");
  check_same_device(boxes, out, "boxes", "out");
  check_contiguous(out, "out");
  MRCNN_CHECK_VALUE(out.numel() == boxes.numel(), "out must have the shape of boxes, got ", out.shape_str());
  if (boxes.numel() == 0) return;
  if (boxes.is_cuda()) {
    MRCNN_IF_CUDA(clip_boxes_cuda(boxes, height, width, out, stream));
  } else {
    clip_boxes_cpu(boxes, height, width, out);
  }
}

void box_size_mask(const TensorView& boxes, double min_size, const TensorView& keep, Stream stream) {
  check_boxes_arg(boxes, "boxes");
  MRCNN_CHECK_VALUE(!std::isnan(min_size), "min_size must not be NaN");
  check_ndim(keep, 1, "keep");
  check_dtype(keep, DType::Bool, "keep");
  check_same_device(boxes, keep, "boxes", "keep");
  check_contiguous(keep, "keep");
  MRCNN_CHECK_VALUE(keep.size(0) == boxes.size(0), "keep must have shape [N], got ", keep.shape_str());
  if (boxes.size(0) == 0) return;
  if (boxes.is_cuda()) {
    MRCNN_IF_CUDA(box_size_mask_cuda(boxes, min_size, keep, stream));
  } else {
    box_size_mask_cpu(boxes, min_size, keep);
  }
}

}  // namespace mrcnn
