#pragma once
// Box coding with torchvision's BoxCoder conventions (weights (wx, wy, ww, wh); decode clamps dw/dh),
// clipping to the image and the min-size test. Boxes are (x1, y1, x2, y2), no +1.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

struct BoxCoderParams {
  double weights[4] = {1.0, 1.0, 1.0, 1.0};  // (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head
  double clip = 4.135166556742356;           // log(1000 / 16): keeps exp(dw) from overflowing
};

// reference_boxes, proposals: [N, 4]; out: [N, 4] deltas that map each proposal onto its reference box.
void encode_boxes(const TensorView& reference_boxes, const TensorView& proposals, const BoxCoderParams& p,
                  const TensorView& out, Stream stream);
// deltas: [N, 4 * K], boxes: [N, 4] (same dtype); out: [N, K, 4], K boxes decoded from every box.
void decode_boxes(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p, const TensorView& out,
                  Stream stream);
// boxes, out: [..., 4] (same shape; may be the same memory): x clamped to [0, width], y to [0, height].
void clip_boxes(const TensorView& boxes, double height, double width, const TensorView& out, Stream stream);
// boxes: [N, 4]; keep: [N] bool, true where both sides are >= min_size.
void box_size_mask(const TensorView& boxes, double min_size, const TensorView& keep, Stream stream);

// ValueError unless every weight is finite and non-zero (shared with generate_proposals).
void check_box_coder_weights(const BoxCoderParams& p);

// ---- backends (arguments already checked) -------------------------------------------------------
void encode_boxes_cpu(const TensorView& reference_boxes, const TensorView& proposals, const BoxCoderParams& p,
                      const TensorView& out);
void decode_boxes_cpu(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p,
                      const TensorView& out);
void clip_boxes_cpu(const TensorView& boxes, double height, double width, const TensorView& out);
void box_size_mask_cpu(const TensorView& boxes, double min_size, const TensorView& keep);
void encode_boxes_cuda(const TensorView& reference_boxes, const TensorView& proposals, const BoxCoderParams& p,
                       const TensorView& out, Stream stream);
void decode_boxes_cuda(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p,
                       const TensorView& out, Stream stream);
void clip_boxes_cuda(const TensorView& boxes, double height, double width, const TensorView& out, Stream stream);
void box_size_mask_cuda(const TensorView& boxes, double min_size, const TensorView& keep, Stream stream);

}  // namespace mrcnn
