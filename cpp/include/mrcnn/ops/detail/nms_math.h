#pragma once
// Pieces of NMS shared by the CPU and CUDA paths: order-preserving integer sort keys for scores and
// the threshold comparison torchvision uses.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "mrcnn/common/fp_math.h"
#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// Unsigned keys whose ascending order is the DESCENDING order of the value, so an ascending stable
// radix sort gives torch's stable descending sort. -0.0 is folded into +0.0 (torch compares them
// equal, so they must tie and keep input order). NaN is rejected before this is reached. Branch-free:
// it runs over every anchor's logit.
MRCNN_HD uint32_t desc_key(float f) {
  uint32_t u = float_bits(f);
  u = (u << 1) ? u : 0u;
  const uint32_t asc = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return ~asc;
}
MRCNN_HD uint64_t desc_key(double f) {
  uint64_t u = double_bits(f);
  u = (u << 1) ? u : uint64_t(0);
  const uint64_t asc = u ^ (static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | 0x8000000000000000ull);
  return ~asc;
}

// torchvision compares the IoU, computed in the box dtype, against the double threshold:
// `iou > thr`. For a float IoU x, x > thr  <=>  x > thr_f, with thr_f the largest float <= thr, so
// the comparison can stay in float (and in SIMD) with exactly the same outcome.
inline float threshold_below(double thr, float) {
  float f = static_cast<float>(thr);
  if (static_cast<double>(f) > thr) f = std::nextafter(f, -FLT_MAX);
  return f;
}
inline double threshold_below(double thr, double) { return thr; }

}  // namespace detail
}  // namespace mrcnn
