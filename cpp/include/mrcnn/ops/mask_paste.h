#pragma once
// Pasting per-box masks into the image, as float or bool images or as COCO RLE (rle.h has the encoders).
//
// Two conventions (detail/mask_paste_math.h has the exact arithmetic), chosen by `aligned`:
//   false: torchvision's paste_masks_in_image (a zero border of `padding`, the box expanded by
//          (Mw + 2 * padding) / Mw, truncated to integers, bilinear resize); equal to it bit for bit on CPUs with FMA.
//   true:  the mask covers the continuous box exactly (detectron2's convention, the inverse of the RoIAlign
//          (aligned=True) that makes the mask targets): image pixel (y, x) is the zero-padded bilinear sample of
//          the mask at u = (x + 0.5 - x1) * Mw / (x2 - x1) - 0.5, v = (y + 0.5 - y1) * Mh / (y2 - y1) - 0.5.
//          `padding` is ignored (still checked >= 0); degenerate boxes (x2 <= x1 or y2 <= y1) paste nothing.
#include <string>
#include <vector>

#include "mrcnn/common/tensor.h"

namespace mrcnn {

// masks: [N, Mh, Mw] floating (CPU: float32/float64; CUDA: also float16/bfloat16), boxes: [N, 4] float32/float64
// (x1, y1, x2, y2) on the masks' device, all contiguous. out: [N, H, W] of the masks' dtype (every element is
// written). CPU boxes must be finite (ValueError naming boxes); CUDA boxes are not checked (that would need
// a device sync): a non-finite CUDA box pastes an all-zero or clamped mask.
void paste_masks(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                 bool aligned, Stream stream);
// As paste_masks followed by `> threshold` (the threshold rounded to the masks' dtype as torch compares),
// without the float image: out [N, H, W] bool.
void paste_masks_binary(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                        bool aligned, double threshold, Stream stream);

// CPU tensors: COCO compressed RLE counts strings (pycocotools' "counts") of the thresholded pasted masks
// of an img_h x img_w image. Only the pixels inside each box are evaluated; runs outside are arithmetic.
std::vector<std::string> paste_masks_rle(const TensorView& masks, const TensorView& boxes, int64_t img_h,
                                         int64_t img_w, int64_t padding, bool aligned, double threshold);

// Device RLE path, step 1 (host): for CPU boxes [N, 4], windows [N, 5] int64 receives each mask's clipped
// image region (y0, x0, h, w) and its offset in a packed crop buffer; returns the buffer's total size. Every pixel
// outside a mask's window is 0 before thresholding. mask_h, mask_w: the masks' size.
int64_t paste_masks_windows(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding, bool aligned,
                            int64_t img_h, int64_t img_w, const TensorView& windows);
// Step 2 (CUDA): crops [total] bool receives every window column-major at its offset (windows on the device).
void paste_masks_crops(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                       const TensorView& crops, int64_t padding, bool aligned, double threshold, int64_t img_h,
                       int64_t img_w, Stream stream);
// Step 3 (host): rle_from_crops (rle.h) encodes the crops.

// The CUDA kernel's loop run sequentially on the CPU (slow; lets the tests check the kernel's indexing without
// a GPU): CPU tensors; windows == nullptr: out [N, H, W] of the masks' dtype (binary = false) or bool (H = img_h,
// W = img_w); else windows [N, 5] as from paste_masks_windows and out the bool crops [total].
void paste_masks_pixelwise(const TensorView& masks, const TensorView& boxes, const TensorView* windows,
                           const TensorView& out, int64_t padding, bool aligned, double threshold, bool binary,
                           int64_t img_h, int64_t img_w);

// ---- backends (arguments already checked) -------------------------------------------------------
void paste_masks_cpu(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                     bool aligned);
void paste_masks_binary_cpu(const TensorView& masks, const TensorView& boxes, const TensorView& out,
                            int64_t padding, bool aligned, double threshold);
std::vector<std::string> paste_masks_rle_cpu(const TensorView& masks, const TensorView& boxes, int64_t img_h,
                                             int64_t img_w, int64_t padding, bool aligned, double threshold);
int64_t paste_masks_windows_cpu(const TensorView& boxes, int64_t mask_h, int64_t mask_w, int64_t padding,
                                bool aligned, int64_t img_h, int64_t img_w, const TensorView& windows);
void paste_masks_pixelwise_cpu(const TensorView& masks, const TensorView& boxes, const TensorView* windows,
                               const TensorView& out, int64_t padding, bool aligned, double threshold, bool binary,
                               int64_t img_h, int64_t img_w);
void paste_masks_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                      bool aligned, Stream stream);
void paste_masks_binary_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out,
                             int64_t padding, bool aligned, double threshold, Stream stream);
void paste_masks_crops_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                            const TensorView& crops, int64_t padding, bool aligned, double threshold, int64_t img_h,
                            int64_t img_w, Stream stream);

}  // namespace mrcnn
