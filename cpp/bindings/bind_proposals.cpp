#include <array>
#include <memory>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "mrcnn/common/check.h"
#include "mrcnn/ops/proposals.h"
#include "dtype_names.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

ProposalParams params(int64_t pre, int64_t post, double nms_thresh, double score_thresh, double min_size,
                      const std::array<double, 4>& w, double clip) {
  ProposalParams p;
  p.pre_nms_top_n = pre;
  p.post_nms_top_n = post;
  p.nms_thresh = nms_thresh;
  p.score_thresh = score_thresh;
  p.min_size = min_size;
  for (int i = 0; i < 4; ++i) p.coder.weights[i] = w[i];
  p.coder.clip = clip;
  return p;
}

void bind(py::module_& m) {
  m.def("proposals_workspace_bytes",
        [](std::vector<int64_t> sizes, int64_t nimg, const std::string& dtype, bool cuda, int64_t pre, int64_t post) {
          ProposalParams p;
          p.pre_nms_top_n = pre;
          p.post_nms_top_n = post;
          return proposals_workspace_bytes(sizes, nimg, parse_float_dtype(dtype),
                                           cuda ? DeviceType::CUDA : DeviceType::CPU, p);
        });
  m.def("generate_proposals",
        [](py::list objectness, py::list deltas, py::list anchors, py::capsule image_sizes, int64_t pre, int64_t post,
           double nms_thresh, double score_thresh, double min_size, std::array<double, 4> w, double clip,
           py::capsule boxes, py::capsule scores, py::capsule counts, py::capsule ws, uintptr_t stream) {
          const size_t nl = objectness.size();
          if (deltas.size() != nl || anchors.size() != nl)
            throw ValueError("objectness, deltas and anchors must have the same number of levels");
          std::vector<std::unique_ptr<Borrowed>> held;
          std::vector<ProposalLevel> levels(nl);
          for (size_t l = 0; l < nl; ++l) {
            held.emplace_back(new Borrowed(objectness[l], "objectness"));
            levels[l].objectness = *held.back();
            held.emplace_back(new Borrowed(deltas[l], "deltas"));
            levels[l].deltas = *held.back();
            held.emplace_back(new Borrowed(anchors[l], "anchors"));
            levels[l].anchors = *held.back();
          }
          Borrowed S(image_sizes, "image_sizes"), B(boxes, "boxes"), SC(scores, "scores"), C(counts, "counts"),
              W(ws, "workspace");
          const ProposalParams p = params(pre, post, nms_thresh, score_thresh, min_size, w, clip);
          py::gil_scoped_release nogil;
          generate_proposals(levels, S, p, B, SC, C, W, as_stream(stream));
        });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
