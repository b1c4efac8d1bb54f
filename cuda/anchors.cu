#include "launch.cuh"
#include "mrcnn/ops/anchors.h"
#include "mrcnn/ops/detail/anchor_math.h"

namespace mrcnn {
namespace {

// Passed by value: the cell anchors live in the kernel's parameter space, no device copy needed.
struct Cells {
  float v[detail::kMaxCellAnchors * 4];
};

// One thread per output scalar. As torchvision: the int shift and the float32 cell anchor are both cast
// to T and added in T (in float for half types, which is what torch's half add computes).
template <class T>
__global__ void grid_anchors_kernel(Cells cells, int A, int64_t W, int64_t stride_h, int64_t stride_w, int64_t total,
                                    T* __restrict__ out) {
  using acc_t = typename cuda::Acc<T>::type;
  MRCNN_GRID_STRIDE(idx, total) {
    const int j = static_cast<int>(idx & 3);
    const int64_t t = idx >> 2;
    const int a = static_cast<int>(t % A);
    const int64_t loc = t / A;
    const int64_t shift = detail::anchor_shift(j, loc % W, loc / W, stride_h, stride_w);
    const T s = cuda::from_acc<T>(static_cast<acc_t>(shift));
    const T c = cuda::from_acc<T>(static_cast<acc_t>(cells.v[4 * a + j]));
    out[idx] = cuda::from_acc<T>(cuda::to_acc(s) + cuda::to_acc(c));
  }
}

}  // namespace

void grid_anchors_cuda(const float* cells, int A, int64_t stride_h, int64_t stride_w, const TensorView& out,
                       Stream stream) {
  cuda::DeviceGuard guard(out.device_id);
  Cells c{};
  for (int i = 0; i < 4 * A; ++i) c.v[i] = cells[i];
  const int64_t total = out.numel(), W = out.size(1);
  MRCNN_DISPATCH_CUDA_FLOAT(out.dtype, "grid_anchors", [&] {
    constexpr int threads = 256;
    grid_anchors_kernel<scalar_t><<<cuda::blocks_for(total, threads), threads, 0, cuda::as_stream(stream)>>>(
        c, A, W, stride_h, stride_w, total, out.ptr<scalar_t>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mrcnn
