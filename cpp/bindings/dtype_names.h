#pragma once
// Float dtypes named as Python spells them (str(torch.float32) without "torch."), for the helpers that
// size device scratch before any tensor exists.
#include <string>

#include "mrcnn/common/check.h"
#include "mrcnn/common/tensor.h"

namespace mrcnn {
namespace bind {

inline DType parse_float_dtype(const std::string& name) {
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "float32") return DType::Float32;
  if (name == "float64") return DType::Float64;
  throw TypeError("unsupported floating dtype " + name);
}

}  // namespace bind
}  // namespace mrcnn
