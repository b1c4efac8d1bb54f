#pragma once
// The inference graph: every step of Mask R-CNN's eval path between the networks, for a whole batch, in the
// three stage calls of the model's eval path (python/mrcnn_fast/modeling/mask_rcnn.py):
//   1. proposal_stage:  RPN objectness + deltas -> proposals (generate_proposals) -> RoIAlign of the box
//                       features (one level, C4, or multi-level, FPN);
//   2. detection_stage: class logits + box deltas -> softmax, class-specific decode, clip, score threshold,
//                       small-box removal, class-aware NMS, top-K per image -> RoIAlign of the mask and keypoint
//                       features of the detections;
//   3. result_stage:    mask logits -> the labelled class's probabilities -> boxes rescaled to the input image,
//                       masks pasted (float, bool or COCO RLE); keypoint heatmaps -> coordinates and scores.
// Each step equals the torch reference of modeling/postprocess.py (same order of operations and tie rules).
//
// Memory: outputs are views of caller memory, as for the core ops. The graph owns its workspaces (the proposal
// scores, packed RoIs, per-(RoI, class) candidate scores and boxes, the per-class lists and NMS scratch, mask
// channels and probabilities, the keypoint resize scratch of each thread); they are allocated on first use,
// grown when a call needs more and reused by later calls, never freed before the graph.
// Threads: the CPU work runs on the core's pool (common/parallel.h) across images, RoIs, classes and
// detections. One graph may be called from several threads: a mutex serialises the calls on its workspaces.
// Devices: CPU tensors only (float32 / float64); CUDA inputs raise ValueError (the Python class falls back to
// the torch stages there).
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mrcnn/common/tensor.h"
#include "mrcnn/ops/box_coder.h"
#include "mrcnn/ops/proposals.h"
#include "mrcnn/ops/roi_align.h"

namespace mrcnn {

// RoIAlign over one level (C4) or the FPN levels (torchvision's LevelMapper picks each RoI's level).
struct GraphPooler {
  int64_t output_size = 7;
  std::vector<double> scales;   // 1 / stride of each level, finest first; one entry: single level
  int64_t sampling_ratio = 2;   // <= 0: adaptive
  bool aligned = true;
  int canonical_level = 4;
  double canonical_scale = 224;
  bool detectron2_levels = false;   // detectron2's level formula (see FpnLevelMap)
};

enum class MaskLoss : int { Sigmoid = 0, Softmax = 1 };
enum class MaskFormat : int { Prob = 0, Bool = 1, Rle = 2 };

struct GraphConfig {
  ProposalParams rpn;                 // test-time pre / post NMS top-n, NMS and score thresholds, min size
  GraphPooler box_pooler;
  BoxCoderParams box_coder;           // the box head's (wx, wy, ww, wh), e.g. (10, 10, 5, 5)
  double score_thresh = 0.05;         // detections with probability > score_thresh are kept
  double nms_thresh = 0.5;            // class-aware NMS IoU threshold
  int64_t detections_per_image = 100;
  double min_box_side = 1e-2;         // roi_heads.test_min_box_side; <= 0: no size filter
  bool mask = false;                  // mask branch on
  GraphPooler mask_pooler;
  MaskLoss mask_loss = MaskLoss::Sigmoid;
  double mask_threshold = 0.5;        // bool / RLE masks: probability > threshold
  bool mask_threshold_inclusive = false;  // probability >= threshold (detectron2) instead
  bool paste_aligned = true;          // true: detectron2's aligned paste; false: torchvision's
  // Boxes rescaled to the input image are clipped to it (detectron2's detector_postprocess). The detections it
  // would leave empty must already be gone (the Python graph drops them before stage 3).
  bool clip_output = false;
  bool keypoint = false;              // keypoint branch on
  GraphPooler keypoint_pooler;
  bool keypoint_score_prob = false;   // keypoint.score "prob" (detectron2) instead of "logit"
};

// ValueError naming the first bad field.
void check_graph_config(const GraphConfig& c);

// Fixed-size detections of N images, at most D = detections_per_image each (postprocess.Detections).
struct GraphDetections {
  TensorView boxes;   // [N, D, 4], the proposals' dtype
  TensorView scores;  // [N, D]
  TensorView labels;  // [N, D] int64
  TensorView counts;  // [N] int64
};

class InferenceGraph {
 public:
  explicit InferenceGraph(const GraphConfig& config);
  ~InferenceGraph();
  InferenceGraph(const InferenceGraph&) = delete;
  InferenceGraph& operator=(const InferenceGraph&) = delete;

  const GraphConfig& config() const { return config_; }

  // Stage 1. rpn: the RPN's outputs per level (see ProposalLevel); image_sizes: [N, 2] float64 (h, w) of the
  // resized images; features: the box pooler's levels [N, C, H_l, W_l] (NCHW or channels-last), in the
  // proposals' dtype. Writes proposals [N, P, 4] (P = rpn.post_nms_top_n, zero rows past counts[i]),
  // counts [N] int64 and box_features rows [0, R) of [>= R, C, S, S] (R = counts.sum(), at most N * P; any
  // strides). Returns R.
  int64_t proposal_stage(const std::vector<ProposalLevel>& rpn, const TensorView& image_sizes,
                         const std::vector<TensorView>& features, const TensorView& proposals,
                         const TensorView& counts, const TensorView& box_features);

  // Stage 2. class_logits [R, C + 1], box_regression [R, 4 (C + 1)] (the proposals' dtype), proposals [N, P, 4]
  // and counts [N] from stage 1, image_sizes as for stage 1, features: the levels the mask / keypoint poolers
  // read (at least as many as they have scales). Writes dets and rows [0, R') of mask_features / keypoint_features
  // ([>= R', C, S, S], R' = dets.counts.sum() <= N * D; nullptr when that branch is off). Returns R'.
  int64_t detection_stage(const TensorView& class_logits, const TensorView& box_regression,
                          const TensorView& proposals, const TensorView& counts, const TensorView& image_sizes,
                          const std::vector<TensorView>& features, const GraphDetections& dets,
                          const TensorView* mask_features, const TensorView* keypoint_features);

  // Stage 3 inputs: dets from stage 2; mask_logits [R', C', M, M] and keypoint_logits [R', K, S, S] in the
  // detections' dtype (nullptr when off); image_sizes / input_sizes [N, 2] float64 (h, w) of the resized and of
  // the input images.
  struct ResultInputs {
    GraphDetections dets;
    const TensorView* mask_logits = nullptr;
    const TensorView* keypoint_logits = nullptr;
    TensorView image_sizes;
    TensorView input_sizes;
  };
  // Stage 3 outputs (packed image after image, R' rows): boxes [R', 4] in the input images; for Prob / Bool
  // masks, masks[i] = [D_i, H0_i, W0_i] of the detections' dtype / bool per image (D_i = dets.counts[i]);
  // keypoints [R', K, 3] and keypoint_scores [R', K] when the keypoint logits are given.
  struct ResultOutputs {
    TensorView boxes;
    std::vector<TensorView> masks;
    TensorView keypoints;
    TensorView keypoint_scores;
  };
  // Returns the COCO RLE counts strings (one per detection, image after image) for MaskFormat::Rle, else {}.
  std::vector<std::string> result_stage(const ResultInputs& in, MaskFormat format, const ResultOutputs& out);

  // Bytes the graph's workspaces hold now (they only grow).
  int64_t workspace_bytes() const;

 private:
  struct Workspace;
  GraphConfig config_;
  std::unique_ptr<Workspace> ws_;
  mutable std::mutex mutex_;
};

// ---- building blocks (arguments already checked; exposed for the tests and for embedding) ---------------

// postprocess.heatmaps_to_keypoints: maps [D, K, S, S], boxes [D, 4] (one dtype) -> xy [D, K, 3], scores [D, K]
// (prob: score="prob", detectron2's peak probability; else the peak logit).
void heatmaps_to_keypoints_cpu(const TensorView& maps, const TensorView& boxes, const TensorView& xy,
                               const TensorView& scores, bool prob = false);

}  // namespace mrcnn
