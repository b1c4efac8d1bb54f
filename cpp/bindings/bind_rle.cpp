#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "mrcnn/ops/rle.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  m.def("rle_encode", [](py::capsule masks) {
    std::vector<std::string> strs;
    {
      Borrowed M(masks, "masks");
      py::gil_scoped_release nogil;
      strs = rle_encode(M);
    }
    return to_bytes_list(strs);
  });
  m.def("rle_from_crops", [](py::capsule crops, py::capsule windows, int64_t img_h, int64_t img_w, bool outside) {
    std::vector<std::string> strs;
    {
      Borrowed C(crops, "crops"), W(windows, "windows");
      py::gil_scoped_release nogil;
      strs = rle_from_crops(C, W, img_h, img_w, outside);
    }
    return to_bytes_list(strs);
  });
  m.def("rle_counts_string", [](const std::vector<uint64_t>& counts) { return py::bytes(rle_counts_string(counts)); });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
