#include "mrcnn/ops/boxes.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  m.def("box_iou", [](py::capsule b1, py::capsule b2, py::capsule out, uintptr_t stream) {
    Borrowed B1(b1, "boxes1"), B2(b2, "boxes2"), O(out, "out");
    py::gil_scoped_release nogil;
    box_iou(B1, B2, O, as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
