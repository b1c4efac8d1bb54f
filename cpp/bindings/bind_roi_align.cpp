#include <pybind11/stl.h>

#include <memory>
#include <vector>

#include "mrcnn/common/check.h"
#include "mrcnn/ops/roi_align.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

RoiAlignOptions options(int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned, bool max_mode,
                        bool quantize) {
  RoiAlignOptions o;
  o.pooled_h = pooled_h;
  o.pooled_w = pooled_w;
  o.sampling_ratio = sampling_ratio;
  o.aligned = aligned;
  o.mode = max_mode ? RoiPoolMode::Max : RoiPoolMode::Avg;
  o.quantize = quantize;
  return o;
}

FpnLevelMap level_map(int k_min, int k_max, int canonical_level, double canonical_scale, bool detectron2) {
  FpnLevelMap m;
  m.detectron2 = detectron2;
  m.k_min = k_min;
  m.k_max = k_max;
  m.canonical_level = canonical_level;
  m.canonical_scale = canonical_scale;
  return m;
}

// A list of capsules as views; the Borrowed objects keep them alive for the call.
struct BorrowedList {
  std::vector<std::unique_ptr<Borrowed>> owned;
  std::vector<TensorView> views;
  BorrowedList(const std::vector<py::object>& caps, const char* name) {
    for (const auto& c : caps) {
      owned.push_back(std::make_unique<Borrowed>(c, name));
      views.push_back(owned.back()->view());
    }
  }
};

void bind(py::module_& m) {
  m.def("roi_align_forward", [](py::capsule input, py::capsule rois, double spatial_scale, int64_t pooled_h,
                                int64_t pooled_w, int64_t sampling_ratio, bool aligned, bool max_mode, bool quantize,
                                py::capsule out, uintptr_t stream) {
    Borrowed I(input, "input"), R(rois, "rois"), O(out, "out");
    const RoiAlignOptions opt = options(pooled_h, pooled_w, sampling_ratio, aligned, max_mode, quantize);
    py::gil_scoped_release nogil;
    roi_align_forward(I, R, spatial_scale, opt, O, as_stream(stream));
  });
  m.def("roi_align_backward", [](py::capsule grad_out, py::capsule input, py::capsule rois, double spatial_scale,
                                 int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
                                 bool max_mode, bool quantize, py::capsule grad_input, uintptr_t stream) {
    Borrowed G(grad_out, "grad_out"), I(input, "input"), R(rois, "rois"), GI(grad_input, "grad_input");
    const RoiAlignOptions opt = options(pooled_h, pooled_w, sampling_ratio, aligned, max_mode, quantize);
    py::gil_scoped_release nogil;
    roi_align_backward(G, I, R, spatial_scale, opt, GI, as_stream(stream));
  });
  m.def("multilevel_roi_align_forward",
        [](std::vector<py::object> features, std::vector<double> scales, py::capsule rois, int k_min, int k_max,
           int canonical_level, double canonical_scale, bool detectron2_levels, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
           bool aligned, bool max_mode, py::capsule out, uintptr_t stream) {
          BorrowedList F(features, "features");
          MRCNN_CHECK_VALUE(scales.size() == F.views.size(), "spatial_scales has ", scales.size(),
                            " entries for ", F.views.size(), " feature levels");
          Borrowed R(rois, "rois"), O(out, "out");
          const RoiAlignOptions opt = options(pooled_h, pooled_w, sampling_ratio, aligned, max_mode, false);
          const FpnLevelMap map = level_map(k_min, k_max, canonical_level, canonical_scale, detectron2_levels);
          py::gil_scoped_release nogil;
          multilevel_roi_align_forward(F.views.data(), scales.data(), static_cast<int>(F.views.size()), R, map, opt,
                                       O, as_stream(stream));
        });
  m.def("multilevel_roi_align_backward",
        [](py::capsule grad_out, std::vector<py::object> features, std::vector<py::object> grad_features,
           std::vector<double> scales, py::capsule rois, int k_min, int k_max, int canonical_level,
           double canonical_scale, bool detectron2_levels, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio, bool aligned,
           bool max_mode, uintptr_t stream) {
          BorrowedList F(features, "features"), GF(grad_features, "grad_features");
          MRCNN_CHECK_VALUE(scales.size() == F.views.size() && GF.views.size() == F.views.size(),
                            "features, grad_features and spatial_scales must have the same length");
          Borrowed G(grad_out, "grad_out"), R(rois, "rois");
          const RoiAlignOptions opt = options(pooled_h, pooled_w, sampling_ratio, aligned, max_mode, false);
          const FpnLevelMap map = level_map(k_min, k_max, canonical_level, canonical_scale, detectron2_levels);
          py::gil_scoped_release nogil;
          multilevel_roi_align_backward(G, F.views.data(), GF.views.data(), scales.data(),
                                        static_cast<int>(F.views.size()), R, map, opt, as_stream(stream));
        });
  m.def("fpn_level_assign", [](py::capsule boxes, int k_min, int k_max, int canonical_level, double canonical_scale,
                               bool detectron2_levels, py::capsule levels, uintptr_t stream) {
    Borrowed B(boxes, "boxes"), L(levels, "levels");
    const FpnLevelMap map = level_map(k_min, k_max, canonical_level, canonical_scale, detectron2_levels);
    py::gil_scoped_release nogil;
    fpn_level_assign(B, map, L, as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
