#pragma once
// Per-element floating-point helpers of the CPU and CUDA kernels, each defined once (float and double overloads).
//
// Rounding, named after CUDA's intrinsics. The torchvision parity tests compare bit for bit, so the kernels say
// where a result is rounded:
//   mul_rn, add_rn, sub_rn  one operation rounded on its own, never contracted into an fma with a neighbour
//                           (torchvision runs such steps as separate tensor ops). The device uses the _rn
//                           intrinsics, which nvcc never fuses; the host uses plain operators, which the build
//                           keeps unfused (-ffp-contract=off for the host compiler in CMakeLists.txt).
//   fma_rn                  a * b + c with one rounding.
//   mul_add<Fused>          fma_rn when Fused, else a * b + c (two roundings on the host; nvcc may fuse it).
// Typed math (floor_t, ceil_t, round_t, sqrt_t, log2_t, exp_t, log_t): the C function of the argument's type
// (floorf for float, floor for double) on the host and the device. Then the bit patterns (float_bits,
// double_bits, non_finite), clamping (clamp, saturate_coord) and linear interpolation (lerp, bilinear_weights).
#include <math.h>
#include <stdint.h>

#include <cstring>

#include "mrcnn/common/hd.h"

namespace mrcnn {
namespace detail {

// ---- rounding ------------------------------------------------------------------------------------
MRCNN_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MRCNN_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MRCNN_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MRCNN_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MRCNN_HD float sub_rn(float a, float b) { return add_rn(a, -b); }
MRCNN_HD double sub_rn(double a, double b) { return add_rn(a, -b); }

MRCNN_HD float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
MRCNN_HD double fma_rn(double a, double b, double c) { return fma(a, b, c); }

template <bool Fused, class T> MRCNN_HD T mul_add(T a, T b, T c) {
  if (Fused) return fma_rn(a, b, c);
  return a * b + c;
}

// ---- typed math ----------------------------------------------------------------------------------
MRCNN_HD float floor_t(float v) { return floorf(v); }
MRCNN_HD double floor_t(double v) { return floor(v); }
MRCNN_HD float ceil_t(float v) { return ceilf(v); }
MRCNN_HD double ceil_t(double v) { return ceil(v); }
// Half away from zero, like std::round (not torch.round, which rounds half to even).
MRCNN_HD float round_t(float v) { return roundf(v); }
MRCNN_HD double round_t(double v) { return round(v); }
MRCNN_HD float sqrt_t(float v) { return sqrtf(v); }
MRCNN_HD double sqrt_t(double v) { return sqrt(v); }
MRCNN_HD float log2_t(float v) { return log2f(v); }
MRCNN_HD double log2_t(double v) { return log2(v); }
MRCNN_HD float exp_t(float v) { return expf(v); }
MRCNN_HD double exp_t(double v) { return exp(v); }
MRCNN_HD float log_t(float v) { return logf(v); }
MRCNN_HD double log_t(double v) { return log(v); }

// ---- classification ------------------------------------------------------------------------------
MRCNN_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
MRCNN_HD uint64_t double_bits(double f) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  std::memcpy(&u, &f, 8);
  return u;
#endif
}

// NaN or +-inf, from the exponent bits (vectorises, unlike std::isfinite under -O3 without fast-math).
MRCNN_HD bool non_finite(float f) { return (float_bits(f) & 0x7f800000u) == 0x7f800000u; }
MRCNN_HD bool non_finite(double f) {
  return (double_bits(f) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// ---- clamping ------------------------------------------------------------------------------------
// torch.clamp(v, lo, hi): NaN stays NaN; hi wins when lo > hi.
template <class T> MRCNN_HD T clamp(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// Image coordinates are clamped to +-2^40 before an integer conversion: no image is that large, and it keeps the
// int64 arithmetic after it free of overflow. NaN goes to -2^40 (a box far off the image).
constexpr double kCoordLimit = 1099511627776.0;
template <class T> MRCNN_HD T saturate_coord(T v) {
  const T lim = T(kCoordLimit);  // exact in float and double
  v = v > -lim ? v : -lim;
  return v < lim ? v : lim;
}

// ---- linear interpolation ------------------------------------------------------------------------
// The blend v0 * w0 + v1 * w1 of two taps; Fused: fma_rn(v0, w0, v1 * w1), as torch's upsample kernels form it.
template <bool Fused, class T> MRCNN_HD T lerp(T v0, T v1, T w0, T w1) {
  if (Fused) return fma_rn(v0, w0, v1 * w1);
  return v0 * w0 + v1 * w1;
}

// The weights of a bilinear sample's four taps (row 0 col 0, row 0 col 1, row 1 col 0, row 1 col 1) from the
// row weights wy0, wy1 and the column weights wx0, wx1.
template <class T> MRCNN_HD void bilinear_weights(T wy0, T wy1, T wx0, T wx1, T w[4]) {
  w[0] = wy0 * wx0;
  w[1] = wy0 * wx1;
  w[2] = wy1 * wx0;
  w[3] = wy1 * wx1;
}

}  // namespace detail
}  // namespace mrcnn
