#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mrcnn/ops/mask_paste.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

py::list to_bytes_list(const std::vector<std::string>& strs) {
  py::list out(strs.size());
  for (size_t i = 0; i < strs.size(); ++i) out[i] = py::bytes(strs[i]);
  return out;
}

// `aligned` (the aligned convention, see mrcnn/ops/mask_paste.h) comes last with a default of false, so that
// callers of the torchvision convention keep their positional arguments.
void bind(py::module_& m) {
  m.def(
      "paste_masks",
      [](py::capsule masks, py::capsule boxes, py::capsule out, int64_t padding, uintptr_t stream, bool aligned) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        py::gil_scoped_release nogil;
        paste_masks(M, B, O, padding, aligned, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("out"), py::arg("padding"), py::arg("stream"),
      py::arg("aligned") = false);
  m.def(
      "paste_masks_binary",
      [](py::capsule masks, py::capsule boxes, py::capsule out, int64_t padding, double threshold, uintptr_t stream,
         bool aligned) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        py::gil_scoped_release nogil;
        paste_masks_binary(M, B, O, padding, aligned, threshold, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("out"), py::arg("padding"), py::arg("threshold"),
      py::arg("stream"), py::arg("aligned") = false);
  m.def(
      "paste_masks_rle",
      [](py::capsule masks, py::capsule boxes, int64_t img_h, int64_t img_w, int64_t padding, double threshold,
         bool aligned) {
        std::vector<std::string> strs;
        {
          Borrowed M(masks, "masks"), B(boxes, "boxes");
          py::gil_scoped_release nogil;
          strs = paste_masks_rle(M, B, img_h, img_w, padding, aligned, threshold);
        }
        return to_bytes_list(strs);
      },
      py::arg("masks"), py::arg("boxes"), py::arg("img_h"), py::arg("img_w"), py::arg("padding"),
      py::arg("threshold"), py::arg("aligned") = false);
  // mask_h (aligned only): None = mask_w.
  m.def(
      "paste_masks_windows",
      [](py::capsule boxes, int64_t mask_w, int64_t padding, int64_t img_h, int64_t img_w, py::capsule windows,
         bool aligned, std::optional<int64_t> mask_h) {
        Borrowed B(boxes, "boxes"), W(windows, "windows");
        return paste_masks_windows(B, mask_h.value_or(mask_w), mask_w, padding, aligned, img_h, img_w, W);
      },
      py::arg("boxes"), py::arg("mask_w"), py::arg("padding"), py::arg("img_h"), py::arg("img_w"),
      py::arg("windows"), py::arg("aligned") = false, py::arg("mask_h") = py::none());
  m.def(
      "paste_masks_crops",
      [](py::capsule masks, py::capsule boxes, py::capsule windows, py::capsule crops, int64_t padding,
         double threshold, int64_t img_h, int64_t img_w, uintptr_t stream, bool aligned) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), W(windows, "windows"), C(crops, "crops");
        py::gil_scoped_release nogil;
        paste_masks_crops(M, B, W, C, padding, aligned, threshold, img_h, img_w, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("windows"), py::arg("crops"), py::arg("padding"),
      py::arg("threshold"), py::arg("img_h"), py::arg("img_w"), py::arg("stream"), py::arg("aligned") = false);
  m.def("rle_from_crops", [](py::capsule crops, py::capsule windows, int64_t img_h, int64_t img_w, bool outside) {
    std::vector<std::string> strs;
    {
      Borrowed C(crops, "crops"), W(windows, "windows");
      py::gil_scoped_release nogil;
      strs = rle_from_crops(C, W, img_h, img_w, outside);
    }
    return to_bytes_list(strs);
  });
  m.def(
      "paste_masks_pixelwise",
      [](py::capsule masks, py::capsule boxes, py::object windows, py::capsule out, int64_t padding,
         double threshold, bool binary, int64_t img_h, int64_t img_w, bool aligned) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        std::unique_ptr<Borrowed> Wn;
        if (!windows.is_none()) Wn = std::make_unique<Borrowed>(windows, "windows");
        py::gil_scoped_release nogil;
        paste_masks_pixelwise(M, B, Wn ? &Wn->view() : nullptr, O, padding, aligned, threshold, binary, img_h,
                              img_w);
      },
      py::arg("masks"), py::arg("boxes"), py::arg("windows"), py::arg("out"), py::arg("padding"),
      py::arg("threshold"), py::arg("binary"), py::arg("img_h"), py::arg("img_w"), py::arg("aligned") = false);
  m.def("rle_encode", [](py::capsule masks) {
    std::vector<std::string> strs;
    {
      Borrowed M(masks, "masks");
      py::gil_scoped_release nogil;
      strs = rle_encode(M);
    }
    return to_bytes_list(strs);
  });
  m.def("rle_counts_string", [](const std::vector<uint64_t>& counts) { return py::bytes(rle_counts_string(counts)); });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
