#include <memory>
#include <string>
#include <vector>

#include "mrcnn/ops/mask_paste.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

void bind(py::module_& m) {
  m.def(
      "paste_masks",
      [](py::capsule masks, py::capsule boxes, py::capsule out, int64_t padding, bool aligned, uintptr_t stream) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        py::gil_scoped_release nogil;
        paste_masks(M, B, O, padding, aligned, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("out"), py::arg("padding"), py::arg("aligned"), py::arg("stream"));
  m.def(
      "paste_masks_binary",
      [](py::capsule masks, py::capsule boxes, py::capsule out, int64_t padding, bool aligned, double threshold,
         uintptr_t stream) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        py::gil_scoped_release nogil;
        paste_masks_binary(M, B, O, padding, aligned, threshold, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("out"), py::arg("padding"), py::arg("aligned"),
      py::arg("threshold"), py::arg("stream"));
  m.def(
      "paste_masks_rle",
      [](py::capsule masks, py::capsule boxes, int64_t img_h, int64_t img_w, int64_t padding, bool aligned,
         double threshold) {
        std::vector<std::string> strs;
        {
          Borrowed M(masks, "masks"), B(boxes, "boxes");
          py::gil_scoped_release nogil;
          strs = paste_masks_rle(M, B, img_h, img_w, padding, aligned, threshold);
        }
        return to_bytes_list(strs);
      },
      py::arg("masks"), py::arg("boxes"), py::arg("img_h"), py::arg("img_w"), py::arg("padding"), py::arg("aligned"),
      py::arg("threshold"));
  m.def(
      "paste_masks_windows",
      [](py::capsule boxes, int64_t mask_h, int64_t mask_w, int64_t padding, bool aligned, int64_t img_h,
         int64_t img_w, py::capsule windows) {
        Borrowed B(boxes, "boxes"), W(windows, "windows");
        return paste_masks_windows(B, mask_h, mask_w, padding, aligned, img_h, img_w, W);
      },
      py::arg("boxes"), py::arg("mask_h"), py::arg("mask_w"), py::arg("padding"), py::arg("aligned"),
      py::arg("img_h"), py::arg("img_w"), py::arg("windows"));
  m.def(
      "paste_masks_crops",
      [](py::capsule masks, py::capsule boxes, py::capsule windows, py::capsule crops, int64_t padding, bool aligned,
         double threshold, int64_t img_h, int64_t img_w, uintptr_t stream) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), W(windows, "windows"), C(crops, "crops");
        py::gil_scoped_release nogil;
        paste_masks_crops(M, B, W, C, padding, aligned, threshold, img_h, img_w, as_stream(stream));
      },
      py::arg("masks"), py::arg("boxes"), py::arg("windows"), py::arg("crops"), py::arg("padding"),
      py::arg("aligned"), py::arg("threshold"), py::arg("img_h"), py::arg("img_w"), py::arg("stream"));
  // windows: None for whole images.
  m.def(
      "paste_masks_pixelwise",
      [](py::capsule masks, py::capsule boxes, py::object windows, py::capsule out, int64_t padding, bool aligned,
         double threshold, bool binary, int64_t img_h, int64_t img_w) {
        Borrowed M(masks, "masks"), B(boxes, "boxes"), O(out, "out");
        std::unique_ptr<Borrowed> Wn;
        if (!windows.is_none()) Wn = std::make_unique<Borrowed>(windows, "windows");
        py::gil_scoped_release nogil;
        paste_masks_pixelwise(M, B, Wn ? &Wn->view() : nullptr, O, padding, aligned, threshold, binary, img_h,
                              img_w);
      },
      py::arg("masks"), py::arg("boxes"), py::arg("windows"), py::arg("out"), py::arg("padding"), py::arg("aligned"),
      py::arg("threshold"), py::arg("binary"), py::arg("img_h"), py::arg("img_w"));
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
