#pragma once
// Max-pool window geometry shared by the CPU and CUDA kernels of bn_relu_max_pool (torch.nn.MaxPool2d's
// conventions with dilation 1 and floor mode: window o covers input cells [o * stride - pad,
// o * stride - pad + kernel), clipped to the map; padding cells never win).
#include <stdint.h>

#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {
namespace maxpool {

// Input cells [lo, hi) of output cell o along an axis of `size` cells.
MRCNN_HD void window(int64_t o, int64_t kernel, int64_t stride, int64_t pad, int64_t size, int64_t& lo,
                     int64_t& hi) {
  lo = o * stride - pad;
  hi = lo + kernel;
  lo = lo > 0 ? lo : 0;
  hi = hi < size ? hi : size;
}

// Output cells [lo, hi) (of `out_size`) whose windows contain input cell i.
MRCNN_HD void covering(int64_t i, int64_t kernel, int64_t stride, int64_t pad, int64_t out_size, int64_t& lo,
                       int64_t& hi) {
  const int64_t first = i + pad - kernel + 1;  // o * stride >= first
  lo = first <= 0 ? 0 : (first + stride - 1) / stride;
  hi = (i + pad) / stride + 1;                 // o * stride <= i + pad
  hi = hi < out_size ? hi : out_size;
}

// Running max that takes the first maximum and lets NaN win (and stick), as torch's max_pool2d does.
template <class T> MRCNN_HD bool takes(T v, T m) { return v > m || (v != v && m == m); }

// ReLU of a window max; NaN passes through as in torch.relu.
template <class T> MRCNN_HD T relu(T m) { return (m > T(0) || m != m) ? m : T(0); }

}  // namespace maxpool
}  // namespace detail
}  // namespace mrcnn
