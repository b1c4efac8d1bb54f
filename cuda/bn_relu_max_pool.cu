#include <math_constants.h>

#include "launch.cuh"
#include "mrcnn/ops/bn_relu_max_pool.h"
#include "mrcnn/ops/detail/map_layout.h"
#include "mrcnn/ops/detail/max_pool_math.h"

namespace mrcnn {
namespace {

namespace mp = detail::maxpool;

// Per-channel reductions: a block is 32 channels x 8 pixel lanes; each thread accumulates one channel over
// a strided set of pixels in float64, the block folds its 8 lanes in shared memory and adds the result to
// the outputs atomically (so the order of the final sum, unlike the CPU path's, is not fixed).
constexpr int kLanes = 8;

// Folds the block's kLanes partial sums of channel c (threadIdx.x) and adds them to out_a[c], out_b[c].
__device__ __forceinline__ void add_lanes(double a, double b, int64_t c, int64_t C, double* out_a, double* out_b) {
  __shared__ double sa[kLanes][32], sb[kLanes][32];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int l = 1; l < kLanes; ++l) {
      a += sa[l][threadIdx.x];
      b += sb[l][threadIdx.x];
    }
    atomicAdd(out_a + c, a);
    atomicAdd(out_b + c, b);
  }
}

template <class T, bool CL>
__global__ void moments_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t H, int64_t W,
                               double* __restrict__ sum, double* __restrict__ sq) {
  const detail::MapStrides s = detail::map_strides(C, H, W, CL);
  const int64_t c = blockIdx.y * 32 + threadIdx.x, HW = H * W, P = N * HW;
  double a = 0, b = 0;
  if (c < C) {
    const double k = static_cast<double>(x[c * s.channel]);
    for (int64_t p = blockIdx.x * int64_t(kLanes) + threadIdx.y; p < P; p += int64_t(gridDim.x) * kLanes) {
      const double d = static_cast<double>(x[(p / HW) * s.batch + c * s.channel + (p % HW) * s.cell]) - k;
      a += d;
      b += d * d;
    }
  }
  add_lanes(a, b, c, C, sum, sq);
}

template <class T>
__global__ void moments_finish_kernel(const T* __restrict__ x, int64_t C, int64_t channel_stride, double M,
                                      double* __restrict__ mean, double* __restrict__ var) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const double m = mean[c] / M, q = var[c] / M - m * m;
  mean[c] = static_cast<double>(x[c * channel_stride]) + m;
  var[c] = q > 0 ? q : 0;
}

// One thread per output element; the flat index runs over the memory order of the layout.
template <class T, bool CL>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ scale, const T* __restrict__ shift,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW, PoolGeometry g,
                               T* __restrict__ out, int32_t* __restrict__ arg) {
  const int64_t total = N * C * OH * OW;
  const detail::MapStrides s = detail::map_strides(C, H, W, CL);
  MRCNN_GRID_STRIDE(idx, total) {
    int64_t n, c, oh, ow;
    detail::unflatten(idx, C, OH, OW, CL, n, c, oh, ow);
    int64_t h0, h1, w0, w1;
    mp::window(oh, g.kernel_h, g.stride_h, g.pad_h, H, h0, h1);
    mp::window(ow, g.kernel_w, g.stride_w, g.pad_w, W, w0, w1);
    const T* base = x + n * s.batch + c * s.channel;
    const T sc = scale[c], sh = shift[c];
    T m = static_cast<T>(-CUDART_INF);
    int64_t best = h0 * W + w0;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const T v = base[(h * W + w) * s.cell] * sc + sh;
        if (mp::takes(v, m)) {
          m = v;
          best = h * W + w;
        }
      }
    }
    out[idx] = mp::relu(m);
    arg[idx] = m <= T(0) ? -1 : static_cast<int32_t>(best);
  }
}

template <class T, bool CL>
__global__ void backward_reduce_kernel(const T* __restrict__ grad, const int32_t* __restrict__ arg,
                                       const T* __restrict__ x, int64_t N,
                                       int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                                       double* __restrict__ sum_g, double* __restrict__ sum_gx) {
  const detail::MapStrides s = detail::map_strides(C, H, W, CL), so = detail::map_strides(C, OH, OW, CL);
  const int64_t c = blockIdx.y * 32 + threadIdx.x, OHW = OH * OW, P = N * OHW, HW = H * W;
  double a = 0, b = 0;
  if (c < C) {
    for (int64_t p = blockIdx.x * int64_t(kLanes) + threadIdx.y; p < P; p += int64_t(gridDim.x) * kLanes) {
      const int64_t n = p / OHW, i = n * so.batch + c * so.channel + (p % OHW) * so.cell;
      const int64_t am = arg[i];
      if (am < 0 || am >= HW) continue;
      const double gv = static_cast<double>(grad[i]);
      a += gv;
      b += gv * static_cast<double>(x[n * s.batch + c * s.channel + am * s.cell]);
    }
  }
  add_lanes(a, b, c, C, sum_g, sum_gx);
}

// One thread per input element: gathers g' from the windows whose arg-max it is.
template <class T, bool CL>
__global__ void backward_input_kernel(const T* __restrict__ grad, const int32_t* __restrict__ arg,
                                      const T* __restrict__ x,
                                      const T* __restrict__ ca, const T* __restrict__ cb, const T* __restrict__ cd,
                                      int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                                      PoolGeometry g, T* __restrict__ gx) {
  const int64_t total = N * C * H * W;
  const detail::MapStrides so = detail::map_strides(C, OH, OW, CL);
  MRCNN_GRID_STRIDE(idx, total) {
    int64_t n, c, h, w;
    detail::unflatten(idx, C, H, W, CL, n, c, h, w);
    int64_t oh0, oh1, ow0, ow1;
    mp::covering(h, g.kernel_h, g.stride_h, g.pad_h, OH, oh0, oh1);
    mp::covering(w, g.kernel_w, g.stride_w, g.pad_w, OW, ow0, ow1);
    const int32_t cell = static_cast<int32_t>(h * W + w);
    T G = T(0);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      for (int64_t ow = ow0; ow < ow1; ++ow) {
        const int64_t i = n * so.batch + c * so.channel + (oh * OW + ow) * so.cell;
        if (arg[i] == cell) G += grad[i];
      }
    }
    // x is read only where b != 0 (batch statistics), as on the CPU: see uses_x there.
    gx[idx] = cb[c] != T(0) ? ca[c] * G + cb[c] * x[idx] + cd[c] : ca[c] * G + cd[c];
  }
}

dim3 reduce_grid(int64_t pixels, int64_t C) {
  const int64_t bx = std::max<int64_t>(1, std::min<int64_t>((pixels + kLanes * 64 - 1) / (kLanes * 64), 1024));
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>((C + 31) / 32));
}

}  // namespace

void channel_moments_cuda(const TensorView& x, const TensorView& mean, const TensorView& var, Stream stream) {
  cuda::DeviceGuard guard(x.device_id);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool cl = !x.is_contiguous();
  const cudaStream_t st = cuda::as_stream(stream);
  MRCNN_CUDA_CHECK(cudaMemsetAsync(mean.ptr<double>(), 0, sizeof(double) * C, st));
  MRCNN_CUDA_CHECK(cudaMemsetAsync(var.ptr<double>(), 0, sizeof(double) * C, st));
  MRCNN_DISPATCH_CUDA_F32_F64(x.dtype, "channel_moments", [&] {
    const dim3 grid = reduce_grid(N * H * W, C), block(32, kLanes);
    if (cl)
      moments_kernel<scalar_t, true><<<grid, block, 0, st>>>(x.ptr<scalar_t>(), N, C, H, W, mean.ptr<double>(),
                                                             var.ptr<double>());
    else
      moments_kernel<scalar_t, false><<<grid, block, 0, st>>>(x.ptr<scalar_t>(), N, C, H, W, mean.ptr<double>(),
                                                              var.ptr<double>());
    MRCNN_CUDA_CHECK_LAUNCH();
    moments_finish_kernel<scalar_t><<<cuda::blocks_for(C, 128), 128, 0, st>>>(
        x.ptr<scalar_t>(), C, cl ? 1 : H * W, static_cast<double>(N * H * W), mean.ptr<double>(), var.ptr<double>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void bn_relu_max_pool_forward_cuda(const TensorView& x, const TensorView& scale, const TensorView& shift,
                                   const PoolGeometry& g, const TensorView& out, const TensorView& argmax,
                                   Stream stream) {
  cuda::DeviceGuard guard(x.device_id);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = out.size(2), OW = out.size(3);
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CUDA_F32_F64(x.dtype, "bn_relu_max_pool", [&] {
    constexpr int threads = 256;
    const unsigned blocks = cuda::blocks_for(out.numel(), threads);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, cuda::as_stream(stream)>>>(x.ptr<scalar_t>(), scale.ptr<scalar_t>(),
                                                              shift.ptr<scalar_t>(), N, C, H, W, OH, OW, g,
                                                              out.ptr<scalar_t>(), argmax.ptr<int32_t>());
    };
    if (cl)
      launch(forward_kernel<scalar_t, true>);
    else
      launch(forward_kernel<scalar_t, false>);
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void bn_relu_max_pool_backward_reduce_cuda(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                           const TensorView& sum_g, const TensorView& sum_gx, Stream stream) {
  cuda::DeviceGuard guard(x.device_id);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = argmax.size(2),
                OW = argmax.size(3);
  const bool cl = !x.is_contiguous();
  const cudaStream_t st = cuda::as_stream(stream);
  MRCNN_CUDA_CHECK(cudaMemsetAsync(sum_g.ptr<double>(), 0, sizeof(double) * C, st));
  MRCNN_CUDA_CHECK(cudaMemsetAsync(sum_gx.ptr<double>(), 0, sizeof(double) * C, st));
  if (N * OH * OW == 0) return;
  MRCNN_DISPATCH_CUDA_F32_F64(x.dtype, "bn_relu_max_pool_backward", [&] {
    const dim3 grid = reduce_grid(N * OH * OW, C), block(32, kLanes);
    auto launch = [&](auto kernel) {
      kernel<<<grid, block, 0, st>>>(grad_out.ptr<scalar_t>(), argmax.ptr<int32_t>(), x.ptr<scalar_t>(), N, C, H,
                                     W, OH, OW, sum_g.ptr<double>(), sum_gx.ptr<double>());
    };
    if (cl)
      launch(backward_reduce_kernel<scalar_t, true>);
    else
      launch(backward_reduce_kernel<scalar_t, false>);
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void bn_relu_max_pool_backward_input_cuda(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                          const TensorView& a, const TensorView& b, const TensorView& d,
                                          const PoolGeometry& g, const TensorView& grad_x, Stream stream) {
  cuda::DeviceGuard guard(x.device_id);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = argmax.size(2),
                OW = argmax.size(3);
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CUDA_F32_F64(x.dtype, "bn_relu_max_pool_backward", [&] {
    constexpr int threads = 256;
    const unsigned blocks = cuda::blocks_for(grad_x.numel(), threads);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, cuda::as_stream(stream)>>>(
          grad_out.ptr<scalar_t>(), argmax.ptr<int32_t>(), x.ptr<scalar_t>(), a.ptr<scalar_t>(), b.ptr<scalar_t>(),
          d.ptr<scalar_t>(), N, C, H, W, OH, OW, g, grad_x.ptr<scalar_t>());
    };
    if (cl)
      launch(backward_input_kernel<scalar_t, true>);
    else
      launch(backward_input_kernel<scalar_t, false>);
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mrcnn
