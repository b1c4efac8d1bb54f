#pragma once
// COCO run-length encoding of binary masks: pycocotools' compressed RLE "counts" strings (column-major runs,
// the first run counting zeros).
#include <cstdint>
#include <string>
#include <vector>

#include "mrcnn/common/tensor.h"

namespace mrcnn {

// masks: [N, H, W] CPU bool or uint8 (non-zero = set), contiguous. One counts string per mask.
std::vector<std::string> rle_encode(const TensorView& masks);

// Masks of an img_h x img_w image known only inside a window each: windows [N, 5] CPU int64 rows (y0, x0, h, w,
// offset) (e.g. from paste_masks_windows), crops [total] CPU bool holding each window column-major at its offset.
// `outside` is the value of every pixel outside its mask's window. One counts string per window.
std::vector<std::string> rle_from_crops(const TensorView& crops, const TensorView& windows, int64_t img_h,
                                        int64_t img_w, bool outside);

// The counts string of explicit run lengths (first run = zeros), as pycocotools' rleToString.
std::string rle_counts_string(const std::vector<uint64_t>& counts);

// ---- backends (arguments already checked) -------------------------------------------------------
std::vector<std::string> rle_encode_cpu(const TensorView& masks);
std::vector<std::string> rle_from_crops_cpu(const TensorView& crops, const TensorView& windows, int64_t img_h,
                                            int64_t img_w, bool outside);

}  // namespace mrcnn
