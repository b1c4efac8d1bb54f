#include <optional>

#include "mrcnn/ops/roi_pool.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  m.def("roi_pool_forward", [](py::capsule input, py::capsule rois, double spatial_scale, py::capsule out,
                               py::capsule argmax, uintptr_t stream) {
    Borrowed I(input, "input"), R(rois, "rois"), O(out, "out"), A(argmax, "argmax");
    py::gil_scoped_release nogil;
    roi_pool_forward(I, R, spatial_scale, O, A, as_stream(stream));
  });
  // workspace: a float32 capsule for half types on CUDA, else None.
  m.def("roi_pool_backward", [](py::capsule grad, py::capsule rois, py::capsule argmax, py::capsule grad_input,
                                py::object workspace, uintptr_t stream) {
    Borrowed G(grad, "grad_output"), R(rois, "rois"), A(argmax, "argmax"), GI(grad_input, "grad_input");
    std::optional<Borrowed> WS;
    if (!workspace.is_none()) WS.emplace(workspace, "workspace");
    const TensorView empty;
    py::gil_scoped_release nogil;
    roi_pool_backward(G, R, A, GI, WS ? WS->view() : empty, as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
