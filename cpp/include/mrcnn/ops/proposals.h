#pragma once
// RPN proposal generation for a batch in one call, step for step torchvision's
// RegionProposalNetwork.filter_proposals after BoxCoder.decode:
//   per image and level: top pre_nms_top_n anchors by objectness logit -> decode those deltas ->
//   clip to the image -> drop boxes with a side < min_size (min_size 0: an empty side, <= 0) ->
//   drop sigmoid(logit) < score_thresh ->
//   NMS per level -> the post_nms_top_n best over all levels, by descending score.
// Ties: equal logits rank by anchor index; equal final scores rank by level, then by logit rank.
// Outputs have fixed size (the CUDA path never waits for the device); rows past counts[n] are 0.
#include <cstdint>
#include <vector>

#include "mrcnn/common/tensor.h"
#include "mrcnn/ops/box_coder.h"

namespace mrcnn {

struct ProposalParams {
  int64_t pre_nms_top_n = 1000;   // per level and image
  int64_t post_nms_top_n = 1000;  // per image
  double nms_thresh = 0.7;
  double score_thresh = 0.0;  // on sigmoid(logit), kept when >=
  double min_size = 1e-3;     // >= 0; 0: only empty boxes are dropped (detectron2's test-time nonempty())
  BoxCoderParams coder;  // RPN: weights (1, 1, 1, 1)
};

// One feature level with A anchors at each of its H * W locations, R = H * W * A, in torchvision's
// order (location-major, anchor-minor).
struct ProposalLevel {
  TensorView objectness;  // [N, R] logits
  TensorView deltas;      // [N, R, 4]
  TensorView anchors;     // [R, 4], shared by the images
};

// Device scratch the CUDA path needs (0 on CPU).
int64_t proposals_workspace_bytes(const std::vector<int64_t>& level_sizes, int64_t num_images, DType dtype,
                                  DeviceType device, const ProposalParams& p);

// image_sizes: [N, 2] float64 (height, width) on the device of the inputs. boxes: [N, post, 4],
// scores: [N, post] (the input dtype), counts: [N] int64. All inputs share one dtype and device.
// CPU: NaN/inf objectness or anchors raise ValueError (non-finite deltas give boxes that are dropped or
// clipped, as in torchvision). CUDA: values are not inspected.
void generate_proposals(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                        const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                        const TensorView& counts, const TensorView& workspace, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
void generate_proposals_cpu(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                            const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                            const TensorView& counts);
void generate_proposals_cuda(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                             const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                             const TensorView& counts, const TensorView& workspace, Stream stream);
int64_t proposals_cuda_workspace_bytes(const std::vector<int64_t>& level_sizes, int64_t num_images, DType dtype,
                                       const ProposalParams& p);

}  // namespace mrcnn
