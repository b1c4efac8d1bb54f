#pragma once
// dtype dispatch: a switch whose cases run the body (a lambda) with scalar_t bound to the C++ type.
#include "mrcnn/common/check.h"

#define MRCNN_DISPATCH_CASE(dt, type, ...)                                                  \
  case ::mrcnn::DType::dt: {                                                                \
    using scalar_t = type;                                                                  \
    return __VA_ARGS__();                                                                   \
  }
// The default case: TypeError naming the op, the device kind ("CPU", "CUDA") and the dtype.
#define MRCNN_DISPATCH_UNSUPPORTED(dtype, name, where)                                      \
  default:                                                                                  \
    throw ::mrcnn::TypeError(                                                               \
        ::mrcnn::detail::str(name, ": unsupported " where " dtype ", ::mrcnn::dtype_name(dtype)))

// The CPU floating types: float32, float64.
#define MRCNN_DISPATCH_CPU_FLOAT(dtype, name, ...)                                          \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      MRCNN_DISPATCH_CASE(Float32, float, __VA_ARGS__)                                      \
      MRCNN_DISPATCH_CASE(Float64, double, __VA_ARGS__)                                     \
      MRCNN_DISPATCH_UNSUPPORTED(dtype, name, "CPU");                                       \
    }                                                                                       \
  }()
