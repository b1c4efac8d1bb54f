#include "mrcnn/ops/bn_relu_max_pool.h"
#include "tensor_adapter.h"

namespace mrcnn {
namespace bind {
namespace {

PoolGeometry geometry(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  return PoolGeometry{kh, kw, sh, sw, ph, pw};
}

void bind(py::module_& m) {
  m.def("channel_moments", [](py::capsule x, py::capsule mean, py::capsule var, uintptr_t stream) {
    Borrowed X(x, "x"), M(mean, "mean"), V(var, "var");
    py::gil_scoped_release nogil;
    channel_moments(X, M, V, as_stream(stream));
  });
  m.def("bn_relu_max_pool_forward", [](py::capsule x, py::capsule scale, py::capsule shift, int64_t kh, int64_t kw,
                                       int64_t sh, int64_t sw, int64_t ph, int64_t pw, py::capsule out,
                                       py::capsule argmax, uintptr_t stream) {
    Borrowed X(x, "x"), S(scale, "scale"), B(shift, "shift"), O(out, "out"), A(argmax, "argmax");
    py::gil_scoped_release nogil;
    bn_relu_max_pool_forward(X, S, B, geometry(kh, kw, sh, sw, ph, pw), O, A, as_stream(stream));
  });
  m.def("bn_relu_max_pool_backward_reduce",
        [](py::capsule grad, py::capsule argmax, py::capsule x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
           int64_t ph, int64_t pw, py::capsule sum_g, py::capsule sum_gx, uintptr_t stream) {
          Borrowed G(grad, "grad_out"), A(argmax, "argmax"), X(x, "x"), SG(sum_g, "sum_g"), SX(sum_gx, "sum_gx");
          py::gil_scoped_release nogil;
          bn_relu_max_pool_backward_reduce(G, A, X, geometry(kh, kw, sh, sw, ph, pw), SG, SX, as_stream(stream));
        });
  m.def("bn_relu_max_pool_backward_input",
        [](py::capsule grad, py::capsule argmax, py::capsule x, py::capsule a, py::capsule b, py::capsule d,
           int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, py::capsule grad_x,
           uintptr_t stream) {
          Borrowed G(grad, "grad_out"), A(argmax, "argmax"), X(x, "x"), CA(a, "a"), CB(b, "b"), CD(d, "d"),
              GX(grad_x, "grad_x");
          py::gil_scoped_release nogil;
          bn_relu_max_pool_backward_input(G, A, X, CA, CB, CD, geometry(kh, kw, sh, sw, ph, pw), GX,
                                          as_stream(stream));
        });
}

}  // namespace
MRCNN_REGISTER_BINDINGS(bind);
}  // namespace bind
}  // namespace mrcnn
