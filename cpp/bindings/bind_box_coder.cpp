#include <array>

#include <pybind11/stl.h>

#include "mrcnn/ops/box_coder.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

BoxCoderParams coder(const std::array<double, 4>& w, double clip) {
  BoxCoderParams p;
  for (int i = 0; i < 4; ++i) p.weights[i] = w[i];
  p.clip = clip;
  return p;
}

void bind(py::module_& m) {
  m.def("encode_boxes", [](py::capsule ref, py::capsule prop, std::array<double, 4> w, py::capsule out,
                           uintptr_t stream) {
    Borrowed R(ref, "reference_boxes"), P(prop, "proposals"), O(out, "out");
    py::gil_scoped_release nogil;
    encode_boxes(R, P, coder(w, 0.0), O, as_stream(stream));
  });
  m.def("decode_boxes", [](py::capsule deltas, py::capsule boxes, std::array<double, 4> w, double clip,
                           py::capsule out, uintptr_t stream) {
    Borrowed D(deltas, "deltas"), B(boxes, "boxes"), O(out, "out");
    py::gil_scoped_release nogil;
    decode_boxes(D, B, coder(w, clip), O, as_stream(stream));
  });
  m.def("clip_boxes", [](py::capsule boxes, double h, double w, py::capsule out, uintptr_t stream) {
    Borrowed B(boxes, "boxes"), O(out, "out");
    py::gil_scoped_release nogil;
    clip_boxes(B, h, w, O, as_stream(stream));
  });
  m.def("box_size_mask", [](py::capsule boxes, double min_size, py::capsule keep, uintptr_t stream) {
    Borrowed B(boxes, "boxes"), K(keep, "keep");
    py::gil_scoped_release nogil;
    box_size_mask(B, min_size, K, as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
