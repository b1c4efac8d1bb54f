#pragma once
// Batch norm (as a per-channel affine) + ReLU + max pooling in one pass: the ResNet stem after conv1,
// without the normalised full-resolution map ever being written (forward) or its gradient being zero-filled
// and scattered (backward). relu(max(.)) equals max(relu(.)) exactly, so out = relu(max over the window of
// x * scale[c] + shift[c]); for training-mode batch norm the caller computes the batch statistics with
// channel_moments and folds them (and gamma, beta) into scale and shift.
#include "mrcnn/common/tensor.h"

namespace mrcnn {

struct PoolGeometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

// x: [N, C, H, W], NCHW-contiguous or channels-last, float32/float64. mean, var: [C] contiguous float64,
// fully overwritten with the mean and the biased variance over (N, H, W) (accumulated in float64; on the CPU
// the sum order is fixed, so the result does not depend on the thread count). N * H * W must be > 0.
void channel_moments(const TensorView& x, const TensorView& mean, const TensorView& var, Stream stream);

// x as above; scale, shift: [C] contiguous, x's dtype. out: [N, C, OH, OW] with x's dtype and layout,
// OH = (H + 2 pad_h - kernel_h) / stride_h + 1 (likewise OW); argmax: out's shape and layout, int32, the
// index h * W + w of the window's first maximum (NaN wins, as in torch.max_pool2d), or -1 where the ReLU
// cut the output (max <= 0: no gradient flows there; a NaN max passes it, as torch.relu's backward does).
// Requires kernel >= 1, stride >= 1, 0 <= pad <= kernel / 2 (every window holds an input cell).
void bn_relu_max_pool_forward(const TensorView& x, const TensorView& scale, const TensorView& shift,
                              const PoolGeometry& g, const TensorView& out, const TensorView& argmax,
                              Stream stream);

// Backward (argmax from the forward; -1 marks the cells the ReLU cut, so out itself is not needed): part 1:
// per-channel sums over the pooled grid of g' = grad_out where argmax != -1, else 0:
// sum_g[c] = sum g', sum_gx[c] = sum g' * x[argmax]. grad_out: argmax's shape and layout, x's dtype.
// sum_g, sum_gx: [C] contiguous float64, overwritten (zeros for an empty batch); on the CPU the sum order is
// fixed as in channel_moments (CUDA adds block partials atomically).
void bn_relu_max_pool_backward_reduce(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                      const PoolGeometry& g, const TensorView& sum_g, const TensorView& sum_gx,
                                      Stream stream);

// Backward, part 2: grad_x = a[c] * G + b[c] * x + d[c], where G at an input cell is the sum of g' over the
// windows whose arg-max is that cell (a gather: every element written once, no zero fill, no atomics).
// a, b, d: [C] contiguous, x's dtype. grad_x: x's shape, dtype and layout.
void bn_relu_max_pool_backward_input(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                     const TensorView& a, const TensorView& b, const TensorView& d,
                                     const PoolGeometry& g, const TensorView& grad_x, Stream stream);

// ---- backends (arguments already checked) -------------------------------------------------------
void channel_moments_cpu(const TensorView& x, const TensorView& mean, const TensorView& var);
void bn_relu_max_pool_forward_cpu(const TensorView& x, const TensorView& scale, const TensorView& shift,
                                  const PoolGeometry& g, const TensorView& out, const TensorView& argmax);
void bn_relu_max_pool_backward_reduce_cpu(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                          const TensorView& sum_g, const TensorView& sum_gx);
void bn_relu_max_pool_backward_input_cpu(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                         const TensorView& a, const TensorView& b, const TensorView& d,
                                         const PoolGeometry& g, const TensorView& grad_x);
void channel_moments_cuda(const TensorView& x, const TensorView& mean, const TensorView& var, Stream stream);
void bn_relu_max_pool_forward_cuda(const TensorView& x, const TensorView& scale, const TensorView& shift,
                                   const PoolGeometry& g, const TensorView& out, const TensorView& argmax,
                                   Stream stream);
void bn_relu_max_pool_backward_reduce_cuda(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                           const TensorView& sum_g, const TensorView& sum_gx, Stream stream);
void bn_relu_max_pool_backward_input_cuda(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                          const TensorView& a, const TensorView& b, const TensorView& d,
                                          const PoolGeometry& g, const TensorView& grad_x, Stream stream);

}  // namespace mrcnn
