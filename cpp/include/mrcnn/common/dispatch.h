#pragma once
#include "mrcnn/common/check.h"

// Runs the body with scalar_t bound to the CPU floating type of `dtype`.
#define MRCNN_DISPATCH_CPU_FLOAT(dtype, name, ...)                                      \
  [&] {                                                                                \
    switch (dtype) {                                                                   \
      case ::mrcnn::DType::Float32: { using scalar_t = float; return __VA_ARGS__(); }  \
      case ::mrcnn::DType::Float64: { using scalar_t = double; return __VA_ARGS__(); } \
      default:                                                                         \
        throw ::mrcnn::TypeError(::mrcnn::detail::str(name, ": unsupported CPU dtype ", \
                                                      ::mrcnn::dtype_name(dtype)));   \
    }                                                                                  \
  }()
