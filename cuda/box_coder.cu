// Element-wise box coding kernels: one thread per box, math in detail/box_coder_math.h (float32
// accumulation for half types).
#include "launch.cuh"
#include "mrcnn/ops/box_coder.h"
#include "mrcnn/ops/detail/box_coder_math.h"

namespace mrcnn {
namespace {

template <class T> using acc_t = typename cuda::Acc<T>::type;
constexpr int kThreads = 256;

template <class T> __device__ __forceinline__ void load4(const T* p, acc_t<T>* out) {
  for (int c = 0; c < 4; ++c) out[c] = cuda::to_acc(p[c]);
}
template <class T> __device__ __forceinline__ void store4(const acc_t<T>* v, T* p) {
  for (int c = 0; c < 4; ++c) p[c] = cuda::from_acc<T>(v[c]);
}

template <class T>
__global__ void encode_kernel(const T* __restrict__ ref, const T* __restrict__ prop, int64_t n,
                              detail::CoderParams<acc_t<T>> p, T* __restrict__ out) {
  MRCNN_GRID_STRIDE(i, n) {
    acc_t<T> r[4], q[4], o[4];
    load4(ref + 4 * i, r);
    load4(prop + 4 * i, q);
    detail::encode_box(r, q, p, o);
    store4(o, out + 4 * i);
  }
}

template <class T>
__global__ void decode_kernel(const T* __restrict__ deltas, const T* __restrict__ boxes, int64_t n, int64_t k,
                              detail::CoderParams<acc_t<T>> p, T* __restrict__ out) {
  MRCNN_GRID_STRIDE(i, n * k) {
    acc_t<T> d[4], b[4], o[4];
    load4(deltas + 4 * i, d);
    load4(boxes + 4 * (i / k), b);
    detail::decode_box(d, b, p, o);
    store4(o, out + 4 * i);
  }
}

template <class T>
__global__ void clip_kernel(const T* __restrict__ boxes, int64_t n, acc_t<T> h, acc_t<T> w, T* __restrict__ out) {
  MRCNN_GRID_STRIDE(i, n) {
    acc_t<T> b[4];
    load4(boxes + 4 * i, b);
    detail::clip_box(b, h, w);
    store4(b, out + 4 * i);
  }
}

template <class T>
__global__ void size_mask_kernel(const T* __restrict__ boxes, int64_t n, acc_t<T> min_size, bool* __restrict__ keep) {
  MRCNN_GRID_STRIDE(i, n) {
    acc_t<T> b[4];
    load4(boxes + 4 * i, b);
    keep[i] = detail::box_big_enough(b, min_size);
  }
}

}  // namespace

void encode_boxes_cuda(const TensorView& ref, const TensorView& prop, const BoxCoderParams& p, const TensorView& out,
                       Stream stream) {
  cuda::DeviceGuard guard(ref.device_id);
  const int64_t n = ref.size(0);
  MRCNN_DISPATCH_CUDA_FLOAT(ref.dtype, "encode_boxes", [&] {
    encode_kernel<scalar_t><<<cuda::blocks_for(n, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
        ref.ptr<scalar_t>(), prop.ptr<scalar_t>(), n, detail::coder_params<acc_t<scalar_t>>(p), out.ptr<scalar_t>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void decode_boxes_cuda(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p,
                       const TensorView& out, Stream stream) {
  cuda::DeviceGuard guard(boxes.device_id);
  const int64_t n = boxes.size(0), k = deltas.size(1) / 4;
  MRCNN_DISPATCH_CUDA_FLOAT(boxes.dtype, "decode_boxes", [&] {
    decode_kernel<scalar_t><<<cuda::blocks_for(n * k, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
        deltas.ptr<scalar_t>(), boxes.ptr<scalar_t>(), n, k, detail::coder_params<acc_t<scalar_t>>(p), out.ptr<scalar_t>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void clip_boxes_cuda(const TensorView& boxes, double height, double width, const TensorView& out, Stream stream) {
  cuda::DeviceGuard guard(boxes.device_id);
  const int64_t n = boxes.numel() / 4;
  MRCNN_DISPATCH_CUDA_FLOAT(boxes.dtype, "clip_boxes", [&] {
    using A = acc_t<scalar_t>;
    clip_kernel<scalar_t><<<cuda::blocks_for(n, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
        boxes.ptr<scalar_t>(), n, A(height), A(width), out.ptr<scalar_t>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void box_size_mask_cuda(const TensorView& boxes, double min_size, const TensorView& keep, Stream stream) {
  cuda::DeviceGuard guard(boxes.device_id);
  const int64_t n = boxes.size(0);
  MRCNN_DISPATCH_CUDA_FLOAT(boxes.dtype, "remove_small_boxes", [&] {
    size_mask_kernel<scalar_t><<<cuda::blocks_for(n, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
        boxes.ptr<scalar_t>(), n, acc_t<scalar_t>(min_size), keep.ptr<bool>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mrcnn
