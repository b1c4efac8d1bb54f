// InferenceGraph: argument checks, workspaces and the order of the steps of each stage. The per-element work
// is in detections_cpu.cpp (stage 2's selection) and results_cpu.cpp (mask probabilities, keypoints).
#include "mrcnn/graph/inference_graph.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/mask_paste.h"
#include "graph_cpu.h"

namespace mrcnn {

namespace {

void check_pooler(const GraphPooler& p, const char* name) {
  MRCNN_CHECK_VALUE(p.output_size >= 1, name, ".output_size must be >= 1, got ", p.output_size);
  MRCNN_CHECK_VALUE(!p.scales.empty() && p.scales.size() <= size_t(kMaxRoiLevels), name, ".scales must hold 1..",
                    kMaxRoiLevels, " levels, got ", p.scales.size());
  for (double s : p.scales)
    MRCNN_CHECK_VALUE(std::isfinite(s) && s > 0, name, ".scales must be finite and positive, got ", s);
  MRCNN_CHECK_VALUE(std::isfinite(p.canonical_scale) && p.canonical_scale > 0, name,
                    ".canonical_scale must be finite and positive, got ", p.canonical_scale);
}

// torchvision's level of a scale: -log2(scale), snapped to the nearest integer when within 1e-6.
int level_of_scale(double s) {
  const double k = -std::log2(s);
  return std::fabs(k - std::round(k)) < 1e-6 ? int(std::round(k)) : int(k);
}

void check_cpu(const TensorView& t, const char* name) {
  MRCNN_CHECK_VALUE(!t.is_cuda(), "InferenceGraph: ", name,
                    " is a CUDA tensor; the graph runs on the CPU only (run the torch stages on CUDA)");
}

void check_shape(const TensorView& t, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = t.ndim == int(shape.size());
  int d = 0;
  for (int64_t s : shape) {
    if (ok && s >= 0 && t.sizes[d] != s) ok = false;
    ++d;
  }
  if (!ok) {
    std::string want = "[";
    d = 0;
    for (int64_t s : shape) want += (d++ ? ", " : "") + (s >= 0 ? std::to_string(s) : std::string("*"));
    throw ValueError(detail::str(name, " must have shape ", want, "], got ", t.shape_str()));
  }
}

TensorView view_of(void* data, DType dtype, std::initializer_list<int64_t> sizes) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = int(sizes.size());
  int d = 0;
  for (int64_t s : sizes) v.sizes[d++] = s;
  int64_t st = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.strides[i] = st;
    st *= v.sizes[i];
  }
  return v;
}

// The first `rows` rows of t (a view with the same strides).
TensorView narrow_rows(const TensorView& t, int64_t rows) {
  TensorView v = t;
  v.sizes[0] = rows;
  return v;
}

// An [R, C, S, S] output of at least `rows` rows for a pooler on features like `f`.
void check_pooled_out(const TensorView& out, int64_t rows, const TensorView& f, const GraphPooler& p,
                      const char* name) {
  check_cpu(out, name);
  check_shape(out, {-1, f.size(1), p.output_size, p.output_size}, name);
  MRCNN_CHECK_VALUE(out.size(0) >= rows, name, " must have at least ", rows, " rows, got ", out.shape_str());
  MRCNN_CHECK_TYPE(out.dtype == f.dtype, name, " must have the features' dtype ", dtype_name(f.dtype), ", got ",
                   dtype_name(out.dtype));
}

void check_features(const std::vector<TensorView>& features, const GraphPooler& p, const TensorView& like,
                    int64_t n, const char* pooler) {
  MRCNN_CHECK_VALUE(features.size() >= p.scales.size(), "features must hold at least ", p.scales.size(),
                    " levels for the ", pooler, " pooler, got ", features.size());
  for (size_t l = 0; l < p.scales.size(); ++l) {
    const TensorView& f = features[l];
    check_cpu(f, "features");
    check_map_layout(f, "features");
    MRCNN_CHECK_VALUE(f.size(0) == n, "features[", l, "] must hold the batch's ", n, " images, got shape ",
                      f.shape_str());
    MRCNN_CHECK_VALUE(f.size(1) == features[0].size(1), "features[", l, "] must have ", features[0].size(1),
                      " channels like features[0], got ", f.shape_str());
    MRCNN_CHECK_TYPE(f.dtype == like.dtype, "features[", l, "] must have the boxes' dtype ", dtype_name(like.dtype),
                     " (float32 features with float32 boxes, float64 with float64), got ", dtype_name(f.dtype));
  }
}

void check_image_sizes(const TensorView& s, int64_t n, const char* name) {
  check_cpu(s, name);
  check_shape(s, {n, 2}, name);
  check_dtype(s, DType::Float64, name);
  check_contiguous(s, name);
  const double* p = s.ptr<double>();
  for (int64_t i = 0; i < 2 * n; ++i)
    MRCNN_CHECK_VALUE(std::isfinite(p[i]) && p[i] > 0, name, " must be finite and positive, got ", p[i]);
}

void check_counts(const TensorView& c, int64_t n, int64_t cap, const char* name) {
  check_cpu(c, name);
  check_shape(c, {n}, name);
  check_dtype(c, DType::Int64, name);
  check_contiguous(c, name);
  const int64_t* p = c.ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    MRCNN_CHECK_VALUE(p[i] >= 0 && p[i] <= cap, name, "[", i, "] must be in 0..", cap, ", got ", p[i]);
}

int64_t sum_counts(const TensorView& c) {
  int64_t t = 0;
  for (int64_t i = 0; i < c.size(0); ++i) t += c.ptr<int64_t>()[i];
  return t;
}

void pool(const GraphPooler& p, const std::vector<TensorView>& features, const TensorView& rois,
          const TensorView& out) {
  RoiAlignOptions opt;
  opt.pooled_h = opt.pooled_w = p.output_size;
  opt.sampling_ratio = p.sampling_ratio;
  opt.aligned = p.aligned;
  const int levels = int(p.scales.size());
  if (levels == 1) {
    roi_align_forward(features[0], rois, p.scales[0], opt, out, nullptr);
    return;
  }
  FpnLevelMap map;
  map.k_min = level_of_scale(p.scales.front());
  map.k_max = level_of_scale(p.scales.back());
  map.canonical_level = p.canonical_level;
  map.canonical_scale = p.canonical_scale;
  map.detectron2 = p.detectron2_levels;
  multilevel_roi_align_forward(features.data(), p.scales.data(), levels, rois, map, opt, out, nullptr);
}

// rois [R, 5] (image index, box) of the valid rows of boxes [N, P, 4], image after image.
template <class T> void pack_rois(const TensorView& boxes, const TensorView& counts, T* rois) {
  const int64_t n = boxes.size(0), p = boxes.size(1);
  const int64_t* c = counts.ptr<int64_t>();
  const T* b = boxes.ptr<T>();
  int64_t r = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c[i]; ++j, ++r) {
      rois[5 * r] = T(i);
      std::memcpy(rois + 5 * r + 1, b + 4 * (i * p + j), 4 * sizeof(T));
    }
}

}  // namespace

// ---- workspaces --------------------------------------------------------------------------------------

void* GraphBuffer::get(int64_t bytes) {
  const size_t words = size_t((bytes + 7) / 8);
  if (store.size() < words) store.resize(words);
  return store.data();
}

struct InferenceGraph::Workspace {
  GraphBuffer rpn_scores, rois, mask_probs, boxes, mask_channels, keypoints;
  DetectionScratch detect;
  int64_t bytes() const {
    int64_t b = detect.bytes();
    for (const GraphBuffer* g : {&rpn_scores, &rois, &mask_probs, &boxes, &mask_channels, &keypoints})
      b += 8 * int64_t(g->store.size());
    return b;
  }
};

void check_graph_config(const GraphConfig& c) {
  MRCNN_CHECK_VALUE(c.rpn.pre_nms_top_n >= 0 && c.rpn.post_nms_top_n >= 0,
                    "rpn pre / post NMS top-n must be non-negative, got ", c.rpn.pre_nms_top_n, " / ",
                    c.rpn.post_nms_top_n);
  check_box_coder_weights(c.rpn.coder);
  check_box_coder_weights(c.box_coder);
  check_pooler(c.box_pooler, "box_pooler");
  if (c.mask) check_pooler(c.mask_pooler, "mask_pooler");
  if (c.keypoint) check_pooler(c.keypoint_pooler, "keypoint_pooler");
  MRCNN_CHECK_VALUE(c.detections_per_image >= 0, "detections_per_image must be non-negative, got ",
                    c.detections_per_image);
  for (double v : {c.score_thresh, c.nms_thresh, c.min_box_side, c.mask_threshold, c.rpn.nms_thresh,
                   c.rpn.score_thresh, c.rpn.min_size})
    MRCNN_CHECK_VALUE(!std::isnan(v), "graph thresholds must not be NaN");
  MRCNN_CHECK_VALUE(c.rpn.min_size >= 0, "rpn_min_size must be >= 0, got ", c.rpn.min_size);
}

InferenceGraph::InferenceGraph(const GraphConfig& config) : config_(config), ws_(new Workspace) {
  check_graph_config(config_);
}

InferenceGraph::~InferenceGraph() = default;

int64_t InferenceGraph::workspace_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ws_->bytes();
}

// ---- stage 1 -------------------------------------------------------------------------------------------

int64_t InferenceGraph::proposal_stage(const std::vector<ProposalLevel>& rpn, const TensorView& image_sizes,
                                       const std::vector<TensorView>& features, const TensorView& proposals,
                                       const TensorView& counts, const TensorView& box_features) {
  std::lock_guard<std::mutex> lock(mutex_);
  MRCNN_CHECK_VALUE(!rpn.empty(), "objectness must hold at least one level");
  const TensorView& ref = rpn[0].objectness;
  check_cpu(ref, "objectness");
  check_ndim(ref, 2, "objectness[0]");
  check_float(ref, "objectness[0]");
  const int64_t n = ref.size(0), post = config_.rpn.post_nms_top_n;
  check_cpu(proposals, "proposals");
  check_shape(proposals, {n, post, 4}, "proposals");
  check_dtype(proposals, ref.dtype, "proposals");
  check_contiguous(proposals, "proposals");
  check_cpu(counts, "counts");
  check_shape(counts, {n}, "counts");
  check_dtype(counts, DType::Int64, "counts");
  check_contiguous(counts, "counts");
  check_features(features, config_.box_pooler, ref, n, "box");

  TensorView scores = view_of(ws_->rpn_scores.get(n * post * dtype_size(ref.dtype)), ref.dtype, {n, post});
  TensorView no_ws = view_of(nullptr, DType::UInt8, {0});
  generate_proposals(rpn, image_sizes, config_.rpn, proposals, scores, counts, no_ws, nullptr);

  const int64_t r = sum_counts(counts);
  check_pooled_out(box_features, r, features[0], config_.box_pooler, "box_features");
  if (r == 0) return 0;
  void* rois = ws_->rois.get(5 * r * dtype_size(ref.dtype));
  MRCNN_DISPATCH_CPU_FLOAT(ref.dtype, "proposal_stage", [&] { pack_rois(proposals, counts, (scalar_t*)rois); });
  pool(config_.box_pooler, features, view_of(rois, ref.dtype, {r, 5}), narrow_rows(box_features, r));
  return r;
}

// ---- stage 2 -------------------------------------------------------------------------------------------

int64_t InferenceGraph::detection_stage(const TensorView& class_logits, const TensorView& box_regression,
                                        const TensorView& proposals, const TensorView& counts,
                                        const TensorView& image_sizes, const std::vector<TensorView>& features,
                                        const GraphDetections& dets, const TensorView* mask_features,
                                        const TensorView* keypoint_features) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_cpu(proposals, "proposals");
  check_ndim(proposals, 3, "proposals");
  check_float(proposals, "proposals");
  check_contiguous(proposals, "proposals");
  const DType dt = proposals.dtype;
  const int64_t n = proposals.size(0), p = proposals.size(1), d = config_.detections_per_image;
  MRCNN_CHECK_VALUE(proposals.size(2) == 4, "proposals must have shape [N, P, 4], got ", proposals.shape_str());
  check_counts(counts, n, p, "counts");
  check_image_sizes(image_sizes, n, "image_sizes");
  const int64_t r = sum_counts(counts);
  check_cpu(class_logits, "class_logits");
  check_ndim(class_logits, 2, "class_logits");
  MRCNN_CHECK_VALUE(class_logits.size(0) == r && class_logits.size(1) >= 2, "class_logits must have shape [", r,
                    ", C + 1] (C >= 1; one row per valid proposal), got ", class_logits.shape_str());
  const int64_t c1 = class_logits.size(1);
  check_cpu(box_regression, "box_regression");
  check_shape(box_regression, {r, 4 * c1}, "box_regression");
  for (const TensorView* t : {&class_logits, &box_regression}) {
    MRCNN_CHECK_TYPE(t->dtype == dt, t == &class_logits ? "class_logits" : "box_regression",
                     " must have the proposals' dtype ", dtype_name(dt), ", got ", dtype_name(t->dtype));
  }
  check_contiguous(class_logits, "class_logits");
  check_contiguous(box_regression, "box_regression");
  auto check_out = [](const TensorView& t, const char* name, std::initializer_list<int64_t> shape, DType dtype) {
    check_cpu(t, name);
    check_shape(t, shape, name);
    check_dtype(t, dtype, name);
    check_contiguous(t, name);
  };
  check_out(dets.boxes, "det_boxes", {n, d, 4}, dt);
  check_out(dets.scores, "det_scores", {n, d}, dt);
  check_out(dets.labels, "det_labels", {n, d}, DType::Int64);
  check_out(dets.counts, "det_counts", {n}, DType::Int64);
  MRCNN_CHECK_VALUE(!mask_features || config_.mask, "mask_features given but the graph's mask branch is off");
  MRCNN_CHECK_VALUE(!keypoint_features || config_.keypoint,
                    "keypoint_features given but the graph's keypoint branch is off");
  if (mask_features) check_features(features, config_.mask_pooler, proposals, n, "mask");
  if (keypoint_features) check_features(features, config_.keypoint_pooler, proposals, n, "keypoint");

  MRCNN_DISPATCH_CPU_FLOAT(dt, "detection_stage", [&] {
    select_detections_cpu<scalar_t>(class_logits, box_regression, proposals, counts, image_sizes, config_,
                                    ws_->detect, dets);
  });
  const int64_t rd = sum_counts(dets.counts);
  if (mask_features) check_pooled_out(*mask_features, rd, features[0], config_.mask_pooler, "mask_features");
  if (keypoint_features)
    check_pooled_out(*keypoint_features, rd, features[0], config_.keypoint_pooler, "keypoint_features");
  if (rd == 0 || (!mask_features && !keypoint_features)) return rd;
  void* rois = ws_->rois.get(5 * rd * dtype_size(dt));
  MRCNN_DISPATCH_CPU_FLOAT(dt, "detection_stage", [&] { pack_rois(dets.boxes, dets.counts, (scalar_t*)rois); });
  const TensorView rv = view_of(rois, dt, {rd, 5});
  if (mask_features) pool(config_.mask_pooler, features, rv, narrow_rows(*mask_features, rd));
  if (keypoint_features) pool(config_.keypoint_pooler, features, rv, narrow_rows(*keypoint_features, rd));
  return rd;
}

// ---- stage 3 -------------------------------------------------------------------------------------------

std::vector<std::string> InferenceGraph::result_stage(const ResultInputs& in, MaskFormat format,
                                                      const ResultOutputs& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  const GraphDetections& dets = in.dets;
  check_cpu(dets.boxes, "det_boxes");
  check_ndim(dets.boxes, 3, "det_boxes");
  check_float(dets.boxes, "det_boxes");
  const DType dt = dets.boxes.dtype;
  const int64_t n = dets.boxes.size(0), d = dets.boxes.size(1);
  check_shape(dets.boxes, {n, d, 4}, "det_boxes");
  check_contiguous(dets.boxes, "det_boxes");
  check_cpu(dets.labels, "det_labels");
  check_shape(dets.labels, {n, d}, "det_labels");
  check_dtype(dets.labels, DType::Int64, "det_labels");
  check_contiguous(dets.labels, "det_labels");
  check_counts(dets.counts, n, d, "det_counts");
  check_image_sizes(in.image_sizes, n, "image_sizes");
  check_image_sizes(in.input_sizes, n, "input_sizes");
  const int64_t r = sum_counts(dets.counts);
  check_cpu(out.boxes, "boxes");
  check_shape(out.boxes, {r, 4}, "boxes");
  check_dtype(out.boxes, dt, "boxes");
  check_contiguous(out.boxes, "boxes");
  const int64_t* cnt = dets.counts.ptr<int64_t>();
  const double* hw = in.image_sizes.ptr<double>();
  const double* hw0 = in.input_sizes.ptr<double>();

  // Packed boxes in the resized images (the keypoints are decoded there) and in the input images.
  void* packed = ws_->boxes.get(4 * r * dtype_size(dt));
  MRCNN_DISPATCH_CPU_FLOAT(dt, "result_stage", [&] {
    rescale_boxes_cpu<scalar_t>(dets.boxes, dets.counts, hw, hw0, config_.clip_output, (scalar_t*)packed,
                                out.boxes.ptr<scalar_t>());
  });

  std::vector<std::string> rles;
  if (in.mask_logits) {
    const TensorView& ml = *in.mask_logits;
    check_cpu(ml, "mask_logits");
    check_ndim(ml, 4, "mask_logits");
    MRCNN_CHECK_VALUE(ml.size(0) == r && ml.size(1) >= 1 && ml.size(2) >= 1 && ml.size(3) >= 1,
                      "mask_logits must have shape [", r, ", C', M, M] (one row per detection), got ",
                      ml.shape_str());
    MRCNN_CHECK_TYPE(ml.dtype == dt, "mask_logits must have the detections' dtype ", dtype_name(dt), ", got ",
                     dtype_name(ml.dtype));
    check_contiguous(ml, "mask_logits");
    const int64_t mh = ml.size(2), mw = ml.size(3);
    if (format != MaskFormat::Rle) {
      MRCNN_CHECK_VALUE(int64_t(out.masks.size()) == n, "masks must hold one output per image (", n, "), got ",
                        out.masks.size());
      for (int64_t i = 0; i < n; ++i) {
        const TensorView& m = out.masks[i];
        check_cpu(m, "masks");
        check_shape(m, {cnt[i], int64_t(hw0[2 * i]), int64_t(hw0[2 * i + 1])}, "masks");
        check_dtype(m, format == MaskFormat::Bool ? DType::Bool : dt, "masks");
        check_contiguous(m, "masks");
      }
    }
    void* probs = ws_->mask_probs.get(r * mh * mw * dtype_size(dt));
    MRCNN_DISPATCH_CPU_FLOAT(dt, "result_stage", [&] {
      mask_probs_cpu<scalar_t>(ml, dets.labels, dets.counts, config_.mask_loss, (scalar_t*)probs,
                               ws_->mask_channels);
    });
    // An inclusive threshold (probability >= t) as the core's strict test: > the dtype's predecessor of t.
    double thr = config_.mask_threshold;
    if (config_.mask_threshold_inclusive)
      thr = dt == DType::Float32 ? double(std::nextafter(float(thr), -INFINITY)) : std::nextafter(thr, -INFINITY);
    int64_t start = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = cnt[i];
      if (k == 0) continue;
      const TensorView pm = view_of((char*)probs + start * mh * mw * dtype_size(dt), dt, {k, mh, mw});
      const TensorView pb = view_of(out.boxes.ptr<char>() + start * 4 * dtype_size(dt), dt, {k, 4});
      if (format == MaskFormat::Rle) {
        std::vector<std::string> s = paste_masks_rle(pm, pb, int64_t(hw0[2 * i]), int64_t(hw0[2 * i + 1]), 1,
                                                     config_.paste_aligned, thr);
        for (auto& x : s) rles.push_back(std::move(x));
      } else if (format == MaskFormat::Bool) {
        paste_masks_binary(pm, pb, out.masks[i], 1, config_.paste_aligned, thr, nullptr);
      } else {
        paste_masks(pm, pb, out.masks[i], 1, config_.paste_aligned, nullptr);
      }
      start += k;
    }
  }
  if (in.keypoint_logits) {
    const TensorView& kl = *in.keypoint_logits;
    check_cpu(kl, "keypoint_logits");
    check_ndim(kl, 4, "keypoint_logits");
    MRCNN_CHECK_VALUE(kl.size(0) == r && kl.size(1) >= 1 && kl.size(2) >= 1 && kl.size(3) >= 1,
                      "keypoint_logits must have shape [", r, ", K, S, S] (one row per detection), got ",
                      kl.shape_str());
    MRCNN_CHECK_TYPE(kl.dtype == dt, "keypoint_logits must have the detections' dtype ", dtype_name(dt), ", got ",
                     dtype_name(kl.dtype));
    check_contiguous(kl, "keypoint_logits");
    const int64_t k = kl.size(1);
    for (const TensorView* t : {&out.keypoints, &out.keypoint_scores}) {
      const bool xy = t == &out.keypoints;
      const char* name = xy ? "keypoints" : "keypoint_scores";
      check_cpu(*t, name);
      if (xy) check_shape(*t, {r, k, 3}, name);
      else check_shape(*t, {r, k}, name);
      check_dtype(*t, dt, name);
      check_contiguous(*t, name);
    }
    if (r > 0) {
      heatmaps_to_keypoints_ws(kl, view_of(packed, dt, {r, 4}), out.keypoints, out.keypoint_scores,
                               config_.keypoint_score_prob, ws_->keypoints);
      MRCNN_DISPATCH_CPU_FLOAT(dt, "result_stage", [&] {
        rescale_keypoints_cpu<scalar_t>(dets.counts, hw, hw0, k, out.keypoints.ptr<scalar_t>());
      });
    }
  }
  return rles;
}

}  // namespace mrcnn
