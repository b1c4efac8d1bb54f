#pragma once
// [N, C, H, W] maps stored NCHW-contiguous or channels-last (NHWC), the two layouts the pooling kernels (RoIPool,
// the fused stem op) read in place, shared by their CPU and CUDA code.
#include <stdint.h>

#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// Element strides derived from the sizes (not from the producer's strides, which may be anything on size-1
// dims). `cell` is the stride of the flattened spatial index h * W + w, so element (n, c, idx) lives at
// n * batch + c * channel + idx * cell.
struct MapStrides {
  int64_t batch, channel, cell;
};
MRCNN_HD MapStrides map_strides(int64_t C, int64_t H, int64_t W, bool channels_last) {
  MapStrides s;
  s.batch = C * H * W;
  s.channel = channels_last ? 1 : H * W;
  s.cell = channels_last ? C : 1;
  return s;
}

// (n, c, h, w) of the flat index idx of an [N, C, H, W] grid walked in its memory order: w fastest (NCHW) or
// c fastest (channels-last). One CUDA thread per element then reads and writes neighbouring addresses.
MRCNN_HD void unflatten(int64_t idx, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t& n, int64_t& c,
                        int64_t& h, int64_t& w) {
  if (channels_last) {
    c = idx % C;
    idx /= C;
    w = idx % W;
    idx /= W;
    h = idx % H;
    n = idx / H;
  } else {
    w = idx % W;
    idx /= W;
    h = idx % H;
    idx /= H;
    c = idx % C;
    n = idx / C;
  }
}

}  // namespace detail
}  // namespace mrcnn
