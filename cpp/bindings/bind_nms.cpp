#include <string>

#include "mrcnn/common/check.h"
#include "mrcnn/ops/nms.h"
#include "dtype_names.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  m.def("nms_workspace_bytes", [](int64_t n, const std::string& dtype, bool cuda, bool batched) {
    return nms_workspace_bytes(n, parse_float_dtype(dtype), cuda ? DeviceType::CUDA : DeviceType::CPU, batched);
  });
  m.def("nms", [](py::capsule boxes, py::capsule scores, double thr, py::capsule keep, py::capsule count,
                  py::capsule ws, uintptr_t stream) {
    Borrowed B(boxes, "boxes"), S(scores, "scores"), K(keep, "keep"), C(count, "count"), W(ws, "workspace");
    py::gil_scoped_release nogil;
    nms(B, S, thr, K, C, W, as_stream(stream));
  });
  m.def("batched_nms", [](py::capsule boxes, py::capsule scores, py::capsule idxs, double thr, py::capsule keep,
                          py::capsule count, py::capsule ws, uintptr_t stream) {
    Borrowed B(boxes, "boxes"), S(scores, "scores"), I(idxs, "idxs"), K(keep, "keep"), C(count, "count"),
        W(ws, "workspace");
    py::gil_scoped_release nogil;
    batched_nms(B, S, I, thr, K, C, W, as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
