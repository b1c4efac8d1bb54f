#include "launch.cuh"
#include "mrcnn/ops/boxes.h"
#include "mrcnn/ops/detail/box_math.h"

namespace mrcnn {
namespace {

template <class T>
__global__ void box_iou_kernel(const T* __restrict__ b1, const T* __restrict__ b2, T* __restrict__ out,
                               int64_t N, int64_t M) {
  using acc_t = typename cuda::Acc<T>::type;
  MRCNN_GRID_STRIDE(idx, N * M) {
    const int64_t i = idx / M, j = idx % M;
    acc_t a[4], b[4];
    for (int k = 0; k < 4; ++k) {
      a[k] = cuda::to_acc(b1[4 * i + k]);
      b[k] = cuda::to_acc(b2[4 * j + k]);
    }
    out[idx] = cuda::from_acc<T>(detail::box_iou(a, b));
  }
}

}  // namespace

void box_iou_cuda(const TensorView& b1, const TensorView& b2, const TensorView& out, Stream stream) {
  cuda::DeviceGuard guard(b1.device_id);
  const int64_t N = b1.size(0), M = b2.size(0);
  MRCNN_DISPATCH_CUDA_FLOAT(b1.dtype, "box_iou", [&] {
    constexpr int threads = 256;
    box_iou_kernel<scalar_t><<<cuda::blocks_for(N * M, threads), threads, 0, cuda::as_stream(stream)>>>(
        b1.ptr<scalar_t>(), b2.ptr<scalar_t>(), out.ptr<scalar_t>(), N, M);
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mrcnn
