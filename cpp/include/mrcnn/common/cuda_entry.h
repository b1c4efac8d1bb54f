#pragma once
// Host entry points dispatch to *_cuda functions that exist only in a CUDA build.
#include "mrcnn/common/check.h"

// Without CUDA the call is still compiled (a discarded statement, so its backend need not exist): both builds
// check it, and the arguments it alone uses (the stream) count as used.
#ifdef MRCNN_WITH_CUDA
#define MRCNN_IF_CUDA(call) call
#else
#define MRCNN_IF_CUDA(call)                                                                     \
  do {                                                                                          \
    if constexpr (false) call;                                                                  \
    throw ::mrcnn::ValueError("mrcnn_fast was built without CUDA support; got a CUDA tensor"); \
  } while (0)
#endif

namespace mrcnn {
bool cuda_compiled();     // built with the CUDA kernels
int cuda_device_count();  // 0 without a driver/device or without CUDA support
}  // namespace mrcnn
