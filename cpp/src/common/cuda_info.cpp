#include "mrcnn/common/cuda_entry.h"

#ifdef MRCNN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mrcnn {

bool cuda_compiled() {
#ifdef MRCNN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef MRCNN_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace mrcnn
