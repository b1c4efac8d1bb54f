// Fused batch norm + ReLU + max pool host entry points: argument checks, empty-input early return, dispatch to
// bn_relu_max_pool_cpu.cpp or cuda/bn_relu_max_pool.cu.
#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/ops/bn_relu_max_pool.h"

namespace mrcnn {
namespace {

void check_x(const TensorView& x) {
  check_map_layout(x, "x");
  MRCNN_CHECK_TYPE(x.dtype == DType::Float32 || x.dtype == DType::Float64, "x must be float32 or float64, got ",
                   dtype_name(x.dtype));
  check_int32_plane(x, "x");
}

void check_channel_vec(const TensorView& t, const TensorView& x, DType dtype, const char* name) {
  check_ndim(t, 1, name);
  MRCNN_CHECK_VALUE(t.size(0) == x.size(1), name, " must have shape [C] = [", x.size(1), "], got ",
                    t.shape_str());
  check_dtype(t, dtype, name);
  check_same_device(t, x, name, "x");
  check_contiguous(t, name);
}

void check_geometry(const PoolGeometry& g) {
  MRCNN_CHECK_VALUE(g.kernel_h >= 1 && g.kernel_w >= 1, "kernel_size must be >= 1, got (", g.kernel_h, ", ",
                    g.kernel_w, ")");
  MRCNN_CHECK_VALUE(g.stride_h >= 1 && g.stride_w >= 1, "stride must be >= 1, got (", g.stride_h, ", ", g.stride_w,
                    ")");
  MRCNN_CHECK_VALUE(g.pad_h >= 0 && g.pad_w >= 0 && 2 * g.pad_h <= g.kernel_h && 2 * g.pad_w <= g.kernel_w,
                    "padding must be between 0 and half the kernel size, got (", g.pad_h, ", ", g.pad_w, ")");
}

// out-shaped tensors: [N, C, OH, OW] with the geometry's OH, OW and x's layout.
void check_pooled(const TensorView& t, const TensorView& x, const PoolGeometry& g, DType dtype, const char* name) {
  check_map_layout(t, name);
  const int64_t OH = (x.size(2) + 2 * g.pad_h - g.kernel_h) / g.stride_h + 1;
  const int64_t OW = (x.size(3) + 2 * g.pad_w - g.kernel_w) / g.stride_w + 1;
  MRCNN_CHECK_VALUE(t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.size(2) == OH && t.size(3) == OW, name,
                    " must have shape [", x.size(0), ", ", x.size(1), ", ", OH, ", ", OW, "], got ", t.shape_str());
  check_dtype(t, dtype, name);
  check_same_device(t, x, name, "x");
  MRCNN_CHECK_VALUE(t.is_contiguous() == x.is_contiguous(), name, " must have x's memory layout");
}

void check_backward(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                    const PoolGeometry& g) {
  check_x(x);
  check_geometry(g);
  check_pooled(argmax, x, g, DType::Int32, "argmax");
  check_pooled(grad_out, x, g, x.dtype, "grad_out");
}

}  // namespace

void channel_moments(const TensorView& x, const TensorView& mean, const TensorView& var, Stream stream) {
  check_x(x);
  check_channel_vec(mean, x, DType::Float64, "mean");
  check_channel_vec(var, x, DType::Float64, "var");
  MRCNN_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 0, "channel_moments: x has no elements per channel (shape ",
                    x.shape_str(), ")");
  if (x.size(1) == 0) return;
  if (x.is_cuda()) {
    MRCNN_IF_CUDA(channel_moments_cuda(x, mean, var, stream));
  } else {
    channel_moments_cpu(x, mean, var);
  }
}

void bn_relu_max_pool_forward(const TensorView& x, const TensorView& scale, const TensorView& shift,
                              const PoolGeometry& g, const TensorView& out, const TensorView& argmax,
                              Stream stream) {
  check_x(x);
  check_geometry(g);
  check_channel_vec(scale, x, x.dtype, "scale");
  check_channel_vec(shift, x, x.dtype, "shift");
  check_pooled(out, x, g, x.dtype, "out");
  check_pooled(argmax, x, g, DType::Int32, "argmax");
  if (out.numel() == 0) return;
  if (x.is_cuda()) {
    MRCNN_IF_CUDA(bn_relu_max_pool_forward_cuda(x, scale, shift, g, out, argmax, stream));
  } else {
    bn_relu_max_pool_forward_cpu(x, scale, shift, g, out, argmax);
  }
}

void bn_relu_max_pool_backward_reduce(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                      const PoolGeometry& g, const TensorView& sum_g, const TensorView& sum_gx,
                                      Stream stream) {
  check_backward(grad_out, argmax, x, g);
  check_channel_vec(sum_g, x, DType::Float64, "sum_g");
  check_channel_vec(sum_gx, x, DType::Float64, "sum_gx");
  if (x.size(1) == 0) return;
  if (x.is_cuda()) {
    MRCNN_IF_CUDA(bn_relu_max_pool_backward_reduce_cuda(grad_out, argmax, x, sum_g, sum_gx, stream));
  } else {
    bn_relu_max_pool_backward_reduce_cpu(grad_out, argmax, x, sum_g, sum_gx);
  }
}

void bn_relu_max_pool_backward_input(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                     const TensorView& a, const TensorView& b, const TensorView& d,
                                     const PoolGeometry& g, const TensorView& grad_x, Stream stream) {
  check_backward(grad_out, argmax, x, g);
  check_channel_vec(a, x, x.dtype, "a");
  check_channel_vec(b, x, x.dtype, "b");
  check_channel_vec(d, x, x.dtype, "d");
  check_map_layout(grad_x, "grad_x");
  MRCNN_CHECK_VALUE(grad_x.size(0) == x.size(0) && grad_x.size(1) == x.size(1) && grad_x.size(2) == x.size(2) &&
                        grad_x.size(3) == x.size(3) && grad_x.is_contiguous() == x.is_contiguous(),
                    "grad_x must have x's shape ", x.shape_str(), " and layout, got ", grad_x.shape_str());
  check_dtype(grad_x, x.dtype, "grad_x");
  check_same_device(grad_x, x, "grad_x", "x");
  if (grad_x.numel() == 0) return;
  if (x.is_cuda()) {
    MRCNN_IF_CUDA(bn_relu_max_pool_backward_input_cuda(grad_out, argmax, x, a, b, d, g, grad_x, stream));
  } else {
    bn_relu_max_pool_backward_input_cpu(grad_out, argmax, x, a, b, d, g, grad_x);
  }
}

}  // namespace mrcnn
