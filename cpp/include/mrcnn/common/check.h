#pragma once
// Argument checks that raise typed errors; the bindings map them to Python ValueError / TypeError /
// RuntimeError, so bad input never crashes the process.
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mrcnn/common/tensor.h"

namespace mrcnn {

struct ValueError : std::invalid_argument { using std::invalid_argument::invalid_argument; };
struct TypeError : std::invalid_argument { using std::invalid_argument::invalid_argument; };

namespace detail {
inline void cat(std::ostringstream&) {}
template <class T, class... R> void cat(std::ostringstream& o, const T& v, const R&... r) { o << v; cat(o, r...); }
template <class... A> std::string str(const A&... a) { std::ostringstream o; cat(o, a...); return o.str(); }
}  // namespace detail

}  // namespace mrcnn

#define MRCNN_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) throw ::mrcnn::ValueError(::mrcnn::detail::str(__VA_ARGS__)); } while (0)
#define MRCNN_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) throw ::mrcnn::TypeError(::mrcnn::detail::str(__VA_ARGS__)); } while (0)
#define MRCNN_FAIL(...) throw std::runtime_error(::mrcnn::detail::str(__VA_ARGS__))

namespace mrcnn {
// Common tensor checks used by every host entry point.
inline void check_ndim(const TensorView& t, int ndim, const char* name) {
  MRCNN_CHECK_VALUE(t.ndim == ndim, name, " must be a ", ndim, "-D tensor, got shape ", t.shape_str());
}
inline void check_dtype(const TensorView& t, DType d, const char* name) {
  MRCNN_CHECK_TYPE(t.dtype == d, name, " must have dtype ", dtype_name(d), ", got ", dtype_name(t.dtype));
}
inline void check_float(const TensorView& t, const char* name) {
  const bool ok = t.is_cuda() ? (t.dtype == DType::Float32 || t.dtype == DType::Float16 ||
                                  t.dtype == DType::BFloat16 || t.dtype == DType::Float64)
                              : (t.dtype == DType::Float32 || t.dtype == DType::Float64);
  MRCNN_CHECK_TYPE(ok, name, " has unsupported dtype ", dtype_name(t.dtype), " on ",
                   t.is_cuda() ? "CUDA (float16/bfloat16/float32/float64)" : "CPU (float32/float64)");
}
inline void check_same_device(const TensorView& a, const TensorView& b, const char* na, const char* nb) {
  MRCNN_CHECK_VALUE(a.device == b.device && a.device_id == b.device_id, na, " and ", nb,
                    " must be on the same device");
}
inline void check_contiguous(const TensorView& t, const char* name) {
  MRCNN_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}
// An [N, C, H, W] map stored NCHW-contiguous or channels-last (the layouts the pooling kernels read in place).
inline void check_map_layout(const TensorView& t, const char* name) {
  check_ndim(t, 4, name);
  MRCNN_CHECK_VALUE(t.is_contiguous() || t.is_channels_last(), name,
                    " must be contiguous (NCHW) or channels-last, got strides that are neither");
}
// H * W of an [N, C, H, W] map fits the int32 arg-max of the max-pooling kernels.
inline void check_int32_plane(const TensorView& t, const char* name) {
  MRCNN_CHECK_VALUE(t.size(2) * t.size(3) <= std::numeric_limits<int32_t>::max(), name,
                    ": H * W must fit the int32 arg-max, got ", t.shape_str());
}
// Device scratch of at least `need` bytes (any dtype), on like's device and contiguous when any is needed.
inline void check_workspace(const TensorView& ws, int64_t need, const TensorView& like, const char* like_name) {
  const int64_t have = ws.numel() * dtype_size(ws.dtype);
  MRCNN_CHECK_VALUE(have >= need, "workspace must hold at least ", need, " bytes, got ", have);
  if (need > 0) {
    check_same_device(ws, like, "workspace", like_name);
    check_contiguous(ws, "workspace");
  }
}
}  // namespace mrcnn
