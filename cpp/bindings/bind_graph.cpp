// mrcnn_fast._C.InferenceGraph: the C++ inference graph (mrcnn/graph/inference_graph.h) as a Python class.
// Tensors cross as DLPack capsules (outputs allocated by the caller); every stage call releases the GIL.
#include <memory>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "mrcnn/common/check.h"
#include "mrcnn/graph/inference_graph.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

struct Caps {
  std::vector<std::unique_ptr<Borrowed>> owned;
  std::vector<TensorView> views;
  Caps(const py::list& caps, const char* name) {
    for (const auto& c : caps) {
      owned.push_back(std::make_unique<Borrowed>(c, name));
      views.push_back(owned.back()->view());
    }
  }
};

std::unique_ptr<Borrowed> optional(const py::object& o, const char* name) {
  if (o.is_none()) return nullptr;
  return std::make_unique<Borrowed>(o, name);
}

template <class T> T get(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw ValueError(detail::str("InferenceGraph config is missing '", key, "'"));
  return d[key].cast<T>();
}

// A key whose absence means its default (switches added after the first config layout).
template <class T> T get_or(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) ? d[key].cast<T>() : fallback;
}

GraphPooler pooler(const py::dict& d) {
  GraphPooler p;
  p.output_size = get<int64_t>(d, "output_size");
  p.scales = get<std::vector<double>>(d, "scales");
  p.sampling_ratio = get<int64_t>(d, "sampling_ratio");
  p.aligned = get<bool>(d, "aligned");
  p.canonical_level = get<int>(d, "canonical_level");
  p.canonical_scale = get<double>(d, "canonical_scale");
  const std::string mapping = get_or<std::string>(d, "level_mapping", "torchvision");
  MRCNN_CHECK_VALUE(mapping == "torchvision" || mapping == "detectron2",
                    "level_mapping must be 'torchvision' or 'detectron2', got '", mapping, "'");
  p.detectron2_levels = mapping == "detectron2";
  return p;
}

GraphConfig config_from(const py::dict& d) {
  GraphConfig c;
  c.rpn.pre_nms_top_n = get<int64_t>(d, "rpn_pre_nms_top_n");
  c.rpn.post_nms_top_n = get<int64_t>(d, "rpn_post_nms_top_n");
  c.rpn.nms_thresh = get<double>(d, "rpn_nms_thresh");
  c.rpn.score_thresh = get<double>(d, "rpn_score_thresh");
  c.rpn.min_size = get<double>(d, "rpn_min_size");
  const auto rw = get<std::vector<double>>(d, "rpn_weights");
  const auto bw = get<std::vector<double>>(d, "box_weights");
  MRCNN_CHECK_VALUE(rw.size() == 4 && bw.size() == 4, "rpn_weights and box_weights must hold 4 values");
  for (int i = 0; i < 4; ++i) c.rpn.coder.weights[i] = rw[i], c.box_coder.weights[i] = bw[i];
  c.rpn.coder.clip = c.box_coder.clip = get<double>(d, "bbox_xform_clip");
  c.box_pooler = pooler(get<py::dict>(d, "box_pooler"));
  c.score_thresh = get<double>(d, "score_thresh");
  c.nms_thresh = get<double>(d, "nms_thresh");
  c.detections_per_image = get<int64_t>(d, "detections_per_image");
  c.min_box_side = get<double>(d, "min_box_side");
  const py::object mp = d.contains("mask_pooler") ? py::object(d["mask_pooler"]) : py::none();
  c.mask = !mp.is_none();
  if (c.mask) c.mask_pooler = pooler(mp.cast<py::dict>());
  const std::string loss = get<std::string>(d, "mask_loss");
  MRCNN_CHECK_VALUE(loss == "sigmoid" || loss == "softmax", "mask_loss must be 'sigmoid' or 'softmax', got '", loss,
                    "'");
  c.mask_loss = loss == "sigmoid" ? MaskLoss::Sigmoid : MaskLoss::Softmax;
  c.mask_threshold = get<double>(d, "mask_threshold");
  c.paste_aligned = get<bool>(d, "paste_aligned");
  c.mask_threshold_inclusive = get_or<bool>(d, "mask_threshold_inclusive", false);
  c.clip_output = get_or<bool>(d, "clip_output", false);
  const py::object kp = d.contains("keypoint_pooler") ? py::object(d["keypoint_pooler"]) : py::none();
  c.keypoint = !kp.is_none();
  if (c.keypoint) c.keypoint_pooler = pooler(kp.cast<py::dict>());
  const std::string kscore = get_or<std::string>(d, "keypoint_score", "logit");
  MRCNN_CHECK_VALUE(kscore == "logit" || kscore == "prob", "keypoint_score must be 'logit' or 'prob', got '", kscore,
                    "'");
  c.keypoint_score_prob = kscore == "prob";
  return c;
}

void bind(py::module_& m) {
  py::class_<InferenceGraph>(m, "InferenceGraph")
      .def(py::init([](const py::dict& cfg) { return std::make_unique<InferenceGraph>(config_from(cfg)); }),
           py::arg("config"))
      .def("workspace_bytes", &InferenceGraph::workspace_bytes)
      .def("proposal_stage",
           [](InferenceGraph& g, py::list objectness, py::list deltas, py::list anchors, py::capsule image_sizes,
              py::list features, py::capsule proposals, py::capsule counts, py::capsule box_features) {
             MRCNN_CHECK_VALUE(deltas.size() == objectness.size() && anchors.size() == objectness.size(),
                               "objectness, deltas and anchors must have the same number of levels");
             Caps O(objectness, "objectness"), D(deltas, "deltas"), A(anchors, "anchors"), F(features, "features");
             std::vector<ProposalLevel> levels(O.views.size());
             for (size_t l = 0; l < levels.size(); ++l) levels[l] = {O.views[l], D.views[l], A.views[l]};
             Borrowed S(image_sizes, "image_sizes"), P(proposals, "proposals"), C(counts, "counts"),
                 B(box_features, "box_features");
             py::gil_scoped_release nogil;
             return g.proposal_stage(levels, S, F.views, P, C, B);
           })
      .def("detection_stage",
           [](InferenceGraph& g, py::capsule class_logits, py::capsule box_regression, py::capsule proposals,
              py::capsule counts, py::capsule image_sizes, py::list features, py::capsule det_boxes,
              py::capsule det_scores, py::capsule det_labels, py::capsule det_counts, py::object mask_features,
              py::object keypoint_features) {
             Borrowed L(class_logits, "class_logits"), R(box_regression, "box_regression"),
                 P(proposals, "proposals"), C(counts, "counts"), S(image_sizes, "image_sizes"),
                 DB(det_boxes, "det_boxes"), DS(det_scores, "det_scores"), DL(det_labels, "det_labels"),
                 DC(det_counts, "det_counts");
             Caps F(features, "features");
             auto MF = optional(mask_features, "mask_features"), KF = optional(keypoint_features, "keypoint_features");
             const GraphDetections dets{DB, DS, DL, DC};
             py::gil_scoped_release nogil;
             return g.detection_stage(L, R, P, C, S, F.views, dets, MF ? &MF->view() : nullptr,
                                      KF ? &KF->view() : nullptr);
           })
      .def("result_stage",
           [](InferenceGraph& g, py::capsule det_boxes, py::capsule det_scores, py::capsule det_labels,
              py::capsule det_counts, py::object mask_logits, py::object keypoint_logits, py::capsule image_sizes,
              py::capsule input_sizes, int mask_format, py::capsule boxes, py::list masks, py::object keypoints,
              py::object keypoint_scores) {
             MRCNN_CHECK_VALUE(mask_format >= 0 && mask_format <= 2, "mask_format must be 0 (prob), 1 (bool) or 2 "
                               "(rle), got ", mask_format);
             Borrowed DB(det_boxes, "det_boxes"), DS(det_scores, "det_scores"), DL(det_labels, "det_labels"),
                 DC(det_counts, "det_counts"), S(image_sizes, "image_sizes"), S0(input_sizes, "input_sizes"),
                 B(boxes, "boxes");
             auto ML = optional(mask_logits, "mask_logits"), KL = optional(keypoint_logits, "keypoint_logits");
             auto KP = optional(keypoints, "keypoints"), KS = optional(keypoint_scores, "keypoint_scores");
             MRCNN_CHECK_VALUE(!KL || (KP && KS), "keypoints and keypoint_scores are needed with keypoint_logits");
             Caps M(masks, "masks");
             InferenceGraph::ResultInputs in{{DB, DS, DL, DC}, ML ? &ML->view() : nullptr,
                                             KL ? &KL->view() : nullptr, S, S0};
             InferenceGraph::ResultOutputs out{B, M.views, KP ? KP->view() : TensorView(),
                                               KS ? KS->view() : TensorView()};
             std::vector<std::string> rles;
             {
               py::gil_scoped_release nogil;
               rles = g.result_stage(in, static_cast<MaskFormat>(mask_format), out);
             }
             return to_bytes_list(rles);
           })
      .def_static("heatmaps_to_keypoints", [](py::capsule maps, py::capsule boxes, py::capsule xy,
                                              py::capsule scores, bool prob) {
        Borrowed M(maps, "maps"), B(boxes, "boxes"), X(xy, "xy"), S(scores, "scores");
        const TensorView &mv = M.view(), &bv = B.view(), &xv = X.view(), &sv = S.view();
        for (const TensorView* t : {&mv, &bv, &xv, &sv}) {
          MRCNN_CHECK_VALUE(!t->is_cuda(), "heatmaps_to_keypoints: CPU tensors only");
          MRCNN_CHECK_VALUE(t->is_contiguous(), "heatmaps_to_keypoints: tensors must be contiguous");
          MRCNN_CHECK_TYPE(t->dtype == mv.dtype, "heatmaps_to_keypoints: tensors must share the maps' dtype");
        }
        check_float(mv, "maps");
        check_ndim(mv, 4, "maps");
        const int64_t d = mv.size(0), k = mv.size(1);
        MRCNN_CHECK_VALUE(bv.ndim == 2 && bv.size(0) == d && bv.size(1) == 4, "boxes must have shape [D, 4]");
        MRCNN_CHECK_VALUE(xv.ndim == 3 && xv.size(0) == d && xv.size(1) == k && xv.size(2) == 3,
                          "xy must have shape [D, K, 3]");
        MRCNN_CHECK_VALUE(sv.ndim == 2 && sv.size(0) == d && sv.size(1) == k, "scores must have shape [D, K]");
        MRCNN_CHECK_VALUE(mv.size(2) >= 1 && mv.size(3) >= 1, "maps must have non-empty heatmaps");
        py::gil_scoped_release nogil;
        heatmaps_to_keypoints_cpu(M, B, X, S, prob);
      }, py::arg("maps"), py::arg("boxes"), py::arg("xy"), py::arg("scores"), py::arg("prob") = false);
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
