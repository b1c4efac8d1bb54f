// Mask pasting on CUDA. One kernel serves the three outputs: float images, bool images, and the bool crops of
// the RLE path (each mask's clipped box, column-major, packed; the host then run-length encodes them).
// Blocks are (row band, mask); each thread computes whole pixels from the mask (L1-cached) with the shared
// per-element math, so results equal the CPU kernels' bit for bit (fused multiply-adds on both sides).
#include <type_traits>

#include "launch.cuh"
#include "mrcnn/ops/detail/mask_paste_math.h"
#include "mrcnn/ops/mask_paste.h"

namespace mrcnn {
namespace {

using detail::PastePlan;
using detail::Taps;

enum class Mode { Value, Binary };

// The threshold as torch compares `image > threshold`: rounded to the masks' dtype.
template <class T> __device__ __forceinline__ typename cuda::Acc<T>::type threshold_as(double t) {
  return cuda::to_acc(cuda::from_acc<T>(static_cast<float>(t)));
}
template <> __device__ __forceinline__ double threshold_as<double>(double t) { return t; }

// Writes, for every mask n, the window of rows [y0, y0 + wh) x columns [x0, x0 + ww) of its pasted image at
// out + offset: row-major (whole images, windows == nullptr: the window is the image, offset n * H * W) or
// column-major (crops, windows[n] = (y0, x0, wh, ww, offset)).
template <class T, class B, class O, Mode kMode>
__global__ void paste_kernel(const T* __restrict__ masks, const B* __restrict__ boxes,
                             const int64_t* __restrict__ windows, O* __restrict__ out, int64_t N, int64_t mh,
                             int64_t mw, int64_t pad, int64_t H, int64_t W, B box_scale, double threshold) {
  using A = typename cuda::Acc<T>::type;
  __shared__ PastePlan plan;
  __shared__ int64_t win[5];
  const int64_t ph = mh + 2 * pad, pw = mw + 2 * pad;
  const A thr = threshold_as<T>(threshold);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    if (threadIdx.x == 0) {
      plan = detail::paste_plan(boxes + 4 * n, box_scale, H, W);
      if (windows) {
        for (int k = 0; k < 5; ++k) win[k] = windows[5 * n + k];
      } else {
        win[0] = 0; win[1] = 0; win[2] = H; win[3] = W; win[4] = n * H * W;
      }
    }
    __syncthreads();
    const PastePlan p = plan;
    const bool col_major = windows != nullptr;
    const int64_t y0 = win[0], x0 = win[1], wh = win[2], ww = win[3], offset = win[4];
    const int64_t outer = col_major ? ww : wh, inner = col_major ? wh : ww;
    const A sy = detail::interp_scale<A>(ph, p.h), sx = detail::interp_scale<A>(pw, p.w);
    const T* mask = masks + n * mh * mw;
    auto at = [&](int64_t i, int64_t j) {
      return detail::padded_at<A>(mask, mh, mw, pad, i, j, [](T v) { return cuda::to_acc(v); });
    };
    for (int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
      O* dst = out + offset + o * inner;
      // The outer coordinate's taps are shared by the whole line.
      const int64_t oc = col_major ? x0 + o : y0 + o;
      const bool line_inside = col_major ? (oc >= p.cx0 && oc < p.cx1) : (oc >= p.cy0 && oc < p.cy1);
      Taps<A> to{};
      if (line_inside)
        to = col_major ? detail::source_taps<true>(sx, oc - p.bx0, pw, p.w)
                       : detail::source_taps<true>(sy, oc - p.by0, ph, p.h);
      for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) {
        const int64_t ic = col_major ? y0 + i : x0 + i;
        A v = A(0);
        const bool inside = line_inside && (col_major ? (ic >= p.cy0 && ic < p.cy1) : (ic >= p.cx0 && ic < p.cx1));
        if (inside) {
          const Taps<A> ti = col_major ? detail::source_taps<true>(sy, ic - p.by0, ph, p.h)
                                       : detail::source_taps<true>(sx, ic - p.bx0, pw, p.w);
          const Taps<A>& ty = col_major ? ti : to;
          const Taps<A>& tx = col_major ? to : ti;
          const A v00 = at(ty.i0, tx.i0), v01 = at(ty.i0, tx.i1), v10 = at(ty.i1, tx.i0), v11 = at(ty.i1, tx.i1);
          v = p.small ? detail::blend_small<true>(v00, v01, v10, v11, tx.l0, tx.l1, ty.l0, ty.l1)
                      : detail::blend_separable<true>(v00, v01, v10, v11, tx.l0, tx.l1, ty.l0, ty.l1);
        }
        if constexpr (kMode == Mode::Value) {
          dst[i] = cuda::from_acc<T>(v);
        } else {
          // The value as the float image would hold it.
          dst[i] = cuda::to_acc(cuda::from_acc<T>(v)) > thr;
        }
      }
    }
    __syncthreads();  // the next mask overwrites the shared plan
  }
}

template <Mode kMode>
void launch(const TensorView& masks, const TensorView& boxes, const int64_t* windows, void* out, int64_t padding,
            double threshold, int64_t H, int64_t W, int64_t max_outer, Stream stream) {
  cuda::DeviceGuard guard(masks.device_id);
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(max_outer, 64))),
                  static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  MRCNN_DISPATCH_CUDA_FLOAT(masks.dtype, "paste_masks", [&] {
    using O = std::conditional_t<kMode == Mode::Value, scalar_t, bool>;
    auto go = [&](auto box_tag) {
      using B = decltype(box_tag);
      paste_kernel<scalar_t, B, O, kMode><<<grid, threads, 0, cuda::as_stream(stream)>>>(
          masks.ptr<const scalar_t>(), boxes.ptr<const B>(), windows, static_cast<O*>(out), N, mh, mw, padding, H,
          W, detail::paste_box_scale<B>(mw, padding), threshold);
    };
    if (boxes.dtype == DType::Float64)
      go(double{});
    else
      go(float{});
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void paste_masks_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                      Stream stream) {
  launch<Mode::Value>(masks, boxes, nullptr, out.data, padding, 0.0, out.size(1), out.size(2), out.size(1), stream);
}

void paste_masks_binary_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out,
                             int64_t padding, double threshold, Stream stream) {
  launch<Mode::Binary>(masks, boxes, nullptr, out.data, padding, threshold, out.size(1), out.size(2),
                       out.size(1), stream);
}

void paste_masks_crops_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                            const TensorView& crops, int64_t padding, double threshold, int64_t img_h,
                            int64_t img_w, Stream stream) {
  // Crops are at most a whole image; the grid's row bands then stride over the columns.
  launch<Mode::Binary>(masks, boxes, windows.ptr<const int64_t>(), crops.data, padding, threshold, img_h,
                       img_w, img_w, stream);
}

}  // namespace mrcnn
