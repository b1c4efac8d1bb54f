#pragma once
// CPU pieces of the inference graph (inference_graph.h), shared by its source files.
#include <cstdint>
#include <vector>

#include "mrcnn/graph/inference_graph.h"

namespace mrcnn {

// A growable scratch buffer (8-byte aligned); get() only grows it.
struct GraphBuffer {
  std::vector<double> store;
  void* get(int64_t bytes);
  template <class T> T* as(int64_t n) { return static_cast<T*>(get(n * int64_t(sizeof(T)))); }
};

// Stage 2's scratch: per (RoI, class) candidate scores and boxes, and the per-image / per-class lists.
struct DetectionScratch {
  GraphBuffer score, box, valid, cand, seg, next, nkept, start, kept, flags, soa, order;
  int64_t bytes() const {
    int64_t b = 0;
    for (const GraphBuffer* g : {&score, &box, &valid, &cand, &seg, &next, &nkept, &start, &kept, &flags, &soa, &order})
      b += 8 * int64_t(g->store.size());
    return b;
  }
};

// postprocess.select_detections after class_probs_and_boxes, for the whole batch; writes dets.
template <class T>
void select_detections_cpu(const TensorView& class_logits, const TensorView& box_regression,
                           const TensorView& proposals, const TensorView& counts, const TensorView& image_sizes,
                           const GraphConfig& cfg, DetectionScratch& ws, const GraphDetections& dets);

// Valid detection boxes packed image after image: `resized` as they are, `input` scaled by (w0 / w, h0 / h)
// (each ratio rounded to T, as torch multiplies a T tensor by a Python float).
template <class T>
void rescale_boxes_cpu(const TensorView& boxes, const TensorView& counts, const double* hw, const double* hw0,
                       bool clip, T* resized, T* input);

// postprocess.mask_probs on packed logits [R', C', M, M]: probs [R', M, M]. ws: the packed channels.
template <class T>
void mask_probs_cpu(const TensorView& logits, const TensorView& labels, const TensorView& counts, MaskLoss loss,
                    T* probs, GraphBuffer& ws);

// heatmaps_to_keypoints_cpu with its per-thread scratch in ws.
void heatmaps_to_keypoints_ws(const TensorView& maps, const TensorView& boxes, const TensorView& xy,
                              const TensorView& scores, bool prob, GraphBuffer& ws);

// Keypoint x and y scaled to the input images (detector_postprocess).
template <class T>
void rescale_keypoints_cpu(const TensorView& counts, const double* hw, const double* hw0, int64_t k, T* xy);

}  // namespace mrcnn
