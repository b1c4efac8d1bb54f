#include <pybind11/stl.h>

#include <vector>

#include "mrcnn/ops/anchors.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  // sizes / aspect_ratios arrive as Python floats (double) and are rounded to float32 here, like
  // torchvision's torch.as_tensor(..., dtype=torch.float32).
  m.def("grid_anchors", [](const std::vector<double>& sizes, const std::vector<double>& ratios, int64_t stride_h,
                           int64_t stride_w, py::capsule out, uintptr_t stream) {
    const std::vector<float> s(sizes.begin(), sizes.end()), r(ratios.begin(), ratios.end());
    Borrowed O(out, "out");
    py::gil_scoped_release nogil;
    grid_anchors(s.data(), static_cast<int>(s.size()), r.data(), static_cast<int>(r.size()), stride_h, stride_w, O,
                 as_stream(stream));
  });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
