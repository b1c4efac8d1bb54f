// generate_proposals host entry point: argument checks, empty-batch early return, dispatch to proposals_cpu.cpp
// or cuda/proposals.cu.
#include <cmath>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/box_coder.h"
#include "mrcnn/ops/proposals.h"

namespace mrcnn {

// Only the CUDA path needs scratch (the other arguments are unused without it).
int64_t proposals_workspace_bytes([[maybe_unused]] const std::vector<int64_t>& level_sizes,
                                  [[maybe_unused]] int64_t num_images, [[maybe_unused]] DType dtype, DeviceType device,
                                  [[maybe_unused]] const ProposalParams& p) {
  if (device != DeviceType::CUDA) return 0;
#ifdef MRCNN_WITH_CUDA
  return proposals_cuda_workspace_bytes(level_sizes, num_images, dtype, p);
#else
  return 0;
#endif
}

void generate_proposals(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                        const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                        const TensorView& counts, const TensorView& workspace, Stream stream) {
  MRCNN_CHECK_VALUE(!levels.empty(), "objectness, deltas and anchors must hold at least one level");
  MRCNN_CHECK_VALUE(levels.size() <= 16, "at most 16 levels are supported, got ", levels.size());
  check_ndim(image_sizes, 2, "image_sizes");
  const int64_t nimg = image_sizes.size(0);
  MRCNN_CHECK_VALUE(image_sizes.size(1) == 2, "image_sizes must have shape [N, 2], got ", image_sizes.shape_str());
  check_dtype(image_sizes, DType::Float64, "image_sizes");
  check_contiguous(image_sizes, "image_sizes");
  const TensorView& ref = levels[0].objectness;
  check_float(ref, "objectness");
  std::vector<int64_t> sizes;
  for (size_t l = 0; l < levels.size(); ++l) {
    const ProposalLevel& lv = levels[l];
    check_ndim(lv.objectness, 2, "objectness");
    const int64_t r = lv.objectness.size(1);
    MRCNN_CHECK_VALUE(lv.objectness.size(0) == nimg, "objectness[", l, "] must have shape [N, R] with N = ", nimg,
                      " images, got ", lv.objectness.shape_str());
    MRCNN_CHECK_VALUE(lv.deltas.ndim == 3 && lv.deltas.size(0) == nimg && lv.deltas.size(1) == r &&
                          lv.deltas.size(2) == 4,
                      "deltas[", l, "] must have shape [", nimg, ", ", r, ", 4], got ", lv.deltas.shape_str());
    MRCNN_CHECK_VALUE(lv.anchors.ndim == 2 && lv.anchors.size(0) == r && lv.anchors.size(1) == 4, "anchors[", l,
                      "] must have shape [", r, ", 4], got ", lv.anchors.shape_str());
    MRCNN_CHECK_VALUE(r < (int64_t(1) << 31), "at most 2^31 - 1 anchors per level are supported");
    check_dtype(lv.objectness, ref.dtype, "objectness");
    check_dtype(lv.deltas, ref.dtype, "deltas");
    check_dtype(lv.anchors, ref.dtype, "anchors");
    check_same_device(lv.objectness, ref, "objectness", "objectness[0]");
    check_same_device(lv.deltas, ref, "deltas", "objectness");
    check_same_device(lv.anchors, ref, "anchors", "objectness");
    check_contiguous(lv.objectness, "objectness");
    check_contiguous(lv.deltas, "deltas");
    check_contiguous(lv.anchors, "anchors");
    sizes.push_back(r);
  }
  check_same_device(image_sizes, ref, "image_sizes", "objectness");
  MRCNN_CHECK_VALUE(p.pre_nms_top_n >= 0, "pre_nms_top_n must be >= 0, got ", p.pre_nms_top_n);
  MRCNN_CHECK_VALUE(p.post_nms_top_n >= 0, "post_nms_top_n must be >= 0, got ", p.post_nms_top_n);
  MRCNN_CHECK_VALUE(!std::isnan(p.nms_thresh), "nms_thresh must not be NaN");
  MRCNN_CHECK_VALUE(!std::isnan(p.score_thresh), "score_thresh must not be NaN");
  MRCNN_CHECK_VALUE(p.min_size >= 0, "min_size must be >= 0, got ", p.min_size);
  check_box_coder_weights(p.coder);
  const int64_t post = p.post_nms_top_n;
  MRCNN_CHECK_VALUE(boxes.ndim == 3 && boxes.size(0) == nimg && boxes.size(1) == post && boxes.size(2) == 4,
                    "boxes must have shape [N, post_nms_top_n, 4], got ", boxes.shape_str());
  MRCNN_CHECK_VALUE(scores.ndim == 2 && scores.size(0) == nimg && scores.size(1) == post,
                    "scores must have shape [N, post_nms_top_n], got ", scores.shape_str());
  MRCNN_CHECK_VALUE(counts.ndim == 1 && counts.size(0) == nimg, "counts must have shape [N], got ",
                    counts.shape_str());
  check_dtype(boxes, ref.dtype, "boxes");
  check_dtype(scores, ref.dtype, "scores");
  check_dtype(counts, DType::Int64, "counts");
  for (const TensorView* t : {&boxes, &scores, &counts}) {
    check_same_device(*t, ref, "outputs", "objectness");
    check_contiguous(*t, "outputs");
  }
  if (nimg == 0) return;
  if (ref.is_cuda()) {
    check_workspace(workspace, proposals_workspace_bytes(sizes, nimg, ref.dtype, ref.device, p), ref, "objectness");
    MRCNN_IF_CUDA(generate_proposals_cuda(levels, image_sizes, p, boxes, scores, counts, workspace, stream));
  } else {
    generate_proposals_cpu(levels, image_sizes, p, boxes, scores, counts);
  }
}

}  // namespace mrcnn
