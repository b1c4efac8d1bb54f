#include <math_constants.h>

#include <type_traits>

#include "launch.cuh"
#include "mrcnn/ops/detail/map_layout.h"
#include "mrcnn/ops/detail/roi_pool_math.h"
#include "mrcnn/ops/roi_pool.h"

namespace mrcnn {
namespace {

namespace rp = detail::roipool;

// One thread per output element. For an NCHW map the flat index runs (k, c, ph, pw) so the writes are
// coalesced; for channels-last it runs (k, ph, pw, c) so neighbouring threads read neighbouring channels.
template <class T, bool kChannelsLast>
__global__ void roi_pool_forward_kernel(const T* __restrict__ in, const T* __restrict__ rois, double spatial_scale,
                                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t oh,
                                        int64_t ow, T* __restrict__ out, int32_t* __restrict__ arg) {
  using acc_t = typename cuda::Acc<T>::type;
  const int64_t total = K * C * oh * ow;
  const detail::MapStrides s = detail::map_strides(C, H, W, kChannelsLast);
  MRCNN_GRID_STRIDE(idx, total) {
    int64_t k, c, ph, pw;
    detail::unflatten(idx, C, oh, ow, kChannelsLast, k, c, ph, pw);
    const T* r = rois + 5 * k;
    const rp::Box b = rp::make_box<acc_t>(cuda::to_acc(r[0]), cuda::to_acc(r[1]), cuda::to_acc(r[2]),
                                          cuda::to_acc(r[3]), cuda::to_acc(r[4]),
                                          static_cast<acc_t>(spatial_scale), N);
    int64_t h0, h1, w0, w1;
    rp::bin_range<acc_t>(ph, oh, b.y0, b.h, H, h0, h1);
    rp::bin_range<acc_t>(pw, ow, b.x0, b.w, W, w0, w1);
    const int64_t o = ((k * C + c) * oh + ph) * ow + pw;
    if (b.batch < 0 || h1 <= h0 || w1 <= w0) {
      out[o] = cuda::from_acc<T>(acc_t(0));
      arg[o] = -1;
      continue;
    }
    const T* base = in + b.batch * s.batch + c * s.channel;
    // -inf start (not torchvision's -FLT_MAX) so the true max wins even below -FLT_MAX; NaN never wins.
    acc_t m = static_cast<acc_t>(-CUDART_INF);
    int64_t best = h0 * W + w0;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const acc_t v = cuda::to_acc(base[(h * W + w) * s.cell]);
        if (v > m) {
          m = v;
          best = h * W + w;
        }
      }
    }
    out[o] = cuda::from_acc<T>(m);
    arg[o] = static_cast<int32_t>(best);
  }
}

// One thread per grad_output element, atomically added into its arg-max cell. Acc is T for float and
// double, float (into the workspace) for half types.
template <class T, class Acc, bool kChannelsLast>
__global__ void roi_pool_backward_kernel(const T* __restrict__ grad, const T* __restrict__ rois,
                                         const int32_t* __restrict__ arg, int64_t N, int64_t C, int64_t H,
                                         int64_t W, int64_t K, int64_t P, Acc* __restrict__ gin) {
  const int64_t total = K * C * P, HW = H * W;
  const detail::MapStrides s = detail::map_strides(C, H, W, kChannelsLast);
  MRCNN_GRID_STRIDE(idx, total) {
    const int64_t a = arg[idx];
    if (a < 0 || a >= HW) continue;
    const int64_t k = idx / (C * P), c = (idx / P) % C;
    const int64_t b = rp::batch_index(cuda::to_acc(rois[5 * k]), N);
    if (b < 0) continue;
    atomicAdd(gin + b * s.batch + c * s.channel + a * s.cell, static_cast<Acc>(cuda::to_acc(grad[idx])));
  }
}

template <class T>
__global__ void float_to_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  MRCNN_GRID_STRIDE(i, n)
    dst[i] = cuda::from_acc<T>(src[i]);
}

}  // namespace

void roi_pool_forward_cuda(const TensorView& input, const TensorView& rois, double spatial_scale,
                           const TensorView& out, const TensorView& argmax, Stream stream) {
  cuda::DeviceGuard guard(input.device_id);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0), oh = out.size(2), ow = out.size(3);
  const bool cl = !input.is_contiguous();
  MRCNN_DISPATCH_CUDA_FLOAT(input.dtype, "roi_pool", [&] {
    constexpr int threads = 256;
    const unsigned blocks = cuda::blocks_for(out.numel(), threads);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, cuda::as_stream(stream)>>>(input.ptr<scalar_t>(), rois.ptr<scalar_t>(),
                                                              spatial_scale, N, C, H, W, K, oh, ow,
                                                              out.ptr<scalar_t>(), argmax.ptr<int32_t>());
    };
    if (cl)
      launch(roi_pool_forward_kernel<scalar_t, true>);
    else
      launch(roi_pool_forward_kernel<scalar_t, false>);
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void roi_pool_backward_cuda(const TensorView& grad_output, const TensorView& rois, const TensorView& argmax,
                            const TensorView& grad_input, const TensorView& workspace, Stream stream) {
  cuda::DeviceGuard guard(grad_input.device_id);
  const int64_t N = grad_input.size(0), C = grad_input.size(1), H = grad_input.size(2), W = grad_input.size(3);
  const int64_t K = grad_output.size(0), P = grad_output.size(2) * grad_output.size(3);
  const bool cl = !grad_input.is_contiguous();
  const cudaStream_t st = cuda::as_stream(stream);
  constexpr int threads = 256;
  MRCNN_DISPATCH_CUDA_FLOAT(grad_output.dtype, "roi_pool_backward", [&] {
    using acc_t = typename cuda::Acc<scalar_t>::type;
    constexpr bool kHalf = !std::is_same<scalar_t, acc_t>::value;
    // Half types accumulate in the float32 workspace (half atomics would round every partial sum).
    acc_t* acc = kHalf ? workspace.ptr<acc_t>() : reinterpret_cast<acc_t*>(grad_input.ptr<scalar_t>());
    const int64_t n = grad_input.numel();
    MRCNN_CUDA_CHECK(cudaMemsetAsync(acc, 0, sizeof(acc_t) * n, st));
    const int64_t total = grad_output.numel();
    if (total > 0) {
      const unsigned blocks = cuda::blocks_for(total, threads);
      if (cl)
        roi_pool_backward_kernel<scalar_t, acc_t, true><<<blocks, threads, 0, st>>>(
            grad_output.ptr<scalar_t>(), rois.ptr<scalar_t>(), argmax.ptr<int32_t>(), N, C, H, W, K, P, acc);
      else
        roi_pool_backward_kernel<scalar_t, acc_t, false><<<blocks, threads, 0, st>>>(
            grad_output.ptr<scalar_t>(), rois.ptr<scalar_t>(), argmax.ptr<int32_t>(), N, C, H, W, K, P, acc);
      MRCNN_CUDA_CHECK_LAUNCH();
    }
    if (kHalf) {
      // Same dense layout as grad_input (checked by the entry point), so a flat conversion suffices.
      float_to_kernel<scalar_t><<<cuda::blocks_for(n, threads), threads, 0, st>>>(
          reinterpret_cast<const float*>(acc), grad_input.ptr<scalar_t>(), n);
      MRCNN_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace mrcnn
