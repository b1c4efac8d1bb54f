// Mask pasting on CUDA. One kernel serves the three outputs: float images, bool images, and the bool crops of
// the RLE path (each mask's clipped box, column-major, packed; the host then run-length encodes them).
// Blocks are (band of window lines, mask); each thread computes whole pixels from the mask (L1-cached) with
// detail::pasted_pixel (torchvision's convention) or detail::aligned_pixel (aligned), so results equal the CPU
// kernels' bit for bit (fused multiply-adds on both sides; the aligned coordinates in double on both sides).
// paste_masks_pixelwise (CPU) runs this kernel's loop sequentially, which lets the tests check it without a GPU.
#include <type_traits>

#include "launch.cuh"
#include "mrcnn/ops/detail/mask_paste_math.h"
#include "mrcnn/ops/mask_paste.h"

namespace mrcnn {
namespace {

using detail::AlignedPlan;
using detail::PastePlan;

enum class Mode { Value, Binary };

// The threshold as torch compares `image > threshold`: rounded to the masks' dtype.
template <class T> __device__ __forceinline__ typename cuda::Acc<T>::type threshold_as(double t) {
  return cuda::to_acc(cuda::from_acc<T>(static_cast<float>(t)));
}
template <> __device__ __forceinline__ double threshold_as<double>(double t) { return t; }

// Writes, for every mask n, the window of rows [y0, y0 + wh) x columns [x0, x0 + ww) of its pasted image at
// out + offset: row-major (whole images, windows == nullptr: the window is the image, offset n * H * W) or
// column-major (crops, windows[n] = (y0, x0, wh, ww, offset)). kAligned: the aligned convention.
template <class T, class B, class O, Mode kMode, bool kAligned>
__global__ void paste_kernel(const T* __restrict__ masks, const B* __restrict__ boxes,
                             const int64_t* __restrict__ windows, O* __restrict__ out, int64_t N, int64_t mh,
                             int64_t mw, int64_t pad, int64_t H, int64_t W, B box_scale, double threshold) {
  using A = typename cuda::Acc<T>::type;
  using Plan = std::conditional_t<kAligned, AlignedPlan, PastePlan>;
  __shared__ Plan plan;
  __shared__ int64_t win[5];
  const int64_t ph = mh + 2 * pad, pw = mw + 2 * pad;
  const A thr = threshold_as<T>(threshold);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    if (threadIdx.x == 0) {
      if constexpr (kAligned) {
        plan = detail::aligned_plan(boxes + 4 * n, mh, mw, H, W);
      } else {
        plan = detail::paste_plan(boxes + 4 * n, box_scale, H, W);
      }
      if (windows) {
        for (int k = 0; k < 5; ++k) win[k] = windows[5 * n + k];
      } else {
        win[0] = 0; win[1] = 0; win[2] = H; win[3] = W; win[4] = n * H * W;
      }
    }
    __syncthreads();
    const Plan p = plan;
    const bool col_major = windows != nullptr;
    const int64_t wh = win[2], ww = win[3], offset = win[4];
    const int64_t outer = col_major ? ww : wh, inner = col_major ? wh : ww;
    A sy = A(0), sx = A(0);
    if constexpr (!kAligned) {
      sy = detail::interp_scale<A>(ph, p.h);
      sx = detail::interp_scale<A>(pw, p.w);
    }
    const T* mask = masks + n * mh * mw;
    const auto load = [](T v) { return cuda::to_acc(v); };
    for (int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
      O* dst = out + offset + o * inner;
      for (int64_t i = threadIdx.x; i < inner; i += blockDim.x) {
        int64_t y, x;
        detail::window_pixel(win, col_major, o, i, y, x);
        A v;
        if constexpr (kAligned) {
          v = detail::aligned_pixel<true, A>(p, mask, y, x, load);
        } else {
          v = detail::pasted_pixel<true>(p, mask, mh, mw, pad, sy, sx, y, x, load);
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
            bool aligned, double threshold, int64_t H, int64_t W, int64_t max_outer, Stream stream) {
  cuda::DeviceGuard guard(masks.device_id);
  const int64_t N = masks.size(0), mh = masks.size(1), mw = masks.size(2);
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(max_outer, 64))),
                  static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  MRCNN_DISPATCH_CUDA_FLOAT(masks.dtype, "paste_masks", [&] {
    using O = std::conditional_t<kMode == Mode::Value, scalar_t, bool>;
    auto go = [&](auto box_tag, auto aligned_tag) {
      using B = decltype(box_tag);
      constexpr bool kAligned = decltype(aligned_tag)::value;
      paste_kernel<scalar_t, B, O, kMode, kAligned><<<grid, threads, 0, cuda::as_stream(stream)>>>(
          masks.ptr<const scalar_t>(), boxes.ptr<const B>(), windows, static_cast<O*>(out), N, mh, mw, padding, H,
          W, detail::paste_box_scale<B>(mw, padding), threshold);
    };
    auto go_box = [&](auto aligned_tag) {
      if (boxes.dtype == DType::Float64)
        go(double{}, aligned_tag);
      else
        go(float{}, aligned_tag);
    };
    if (aligned)
      go_box(std::true_type{});
    else
      go_box(std::false_type{});
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

void paste_masks_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out, int64_t padding,
                      bool aligned, Stream stream) {
  launch<Mode::Value>(masks, boxes, nullptr, out.data, padding, aligned, 0.0, out.size(1), out.size(2), out.size(1),
                      stream);
}

void paste_masks_binary_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& out,
                             int64_t padding, bool aligned, double threshold, Stream stream) {
  launch<Mode::Binary>(masks, boxes, nullptr, out.data, padding, aligned, threshold, out.size(1), out.size(2),
                       out.size(1), stream);
}

void paste_masks_crops_cuda(const TensorView& masks, const TensorView& boxes, const TensorView& windows,
                            const TensorView& crops, int64_t padding, bool aligned, double threshold, int64_t img_h,
                            int64_t img_w, Stream stream) {
  // Crops are at most a whole image; the grid's row bands then stride over the columns.
  launch<Mode::Binary>(masks, boxes, windows.ptr<const int64_t>(), crops.data, padding, aligned, threshold, img_h,
                       img_w, img_w, stream);
}

}  // namespace mrcnn
