// RoIAlign / RoIWarp / multi-level RoIAlign on CUDA: one thread per output element (forward) or per
// grad_out element (backward, float/double atomics; float16/bfloat16 features accumulate into a
// float32 gradient buffer). The level of a RoI is computed in the kernel, so one launch covers all
// levels: their base pointers, shapes and strides travel in a small by-value struct.
#include <math_constants.h>

#include "launch.cuh"
#include "mrcnn/ops/detail/map_layout.h"
#include "mrcnn/ops/detail/roi_align_math.h"
#include "mrcnn/ops/roi_align.h"

namespace mrcnn {
namespace {

using detail::Lerp;

template <class T, class G> struct LevelArgs {
  const T* data[kMaxRoiLevels];
  G* grad[kMaxRoiLevels];
  int64_t H[kMaxRoiLevels], W[kMaxRoiLevels];
  int64_t sN[kMaxRoiLevels], sC[kMaxRoiLevels], sH[kMaxRoiLevels], sW[kMaxRoiLevels];
  double scale[kMaxRoiLevels];
  int count;
  int64_t N, C;
};

struct KernelOpts {
  int pooled_h, pooled_w, sampling_ratio;
  bool aligned, max_mode, quantize;
  bool use_map;
  int k_min, k_max, canonical_level;
  double canonical_scale;
  bool detectron2_levels;
  bool channels_fastest;  // channels-last: consecutive threads take consecutive channels (coalesced)
};

__device__ __forceinline__ void decompose(int64_t idx, int64_t C, const KernelOpts& o, int64_t& k, int64_t& c,
                                          int& ph, int& pw) {
  int64_t h, w;
  detail::unflatten(idx, C, o.pooled_h, o.pooled_w, o.channels_fastest, k, c, h, w);
  ph = static_cast<int>(h);
  pw = static_cast<int>(w);
}

template <class A> struct RoiCtx {
  int level;
  int64_t n;
  detail::RoiBins<A> bins;
};

// Level, image and bins of RoI r; false if nothing is pooled (bad batch index or coordinates, which the
// host-side checks reject, or a level outside the given features).
template <class A, class LV>
__device__ bool roi_context(const A* r, const LV& lv, const KernelOpts& o, RoiCtx<A>& ctx) {
  for (int j = 0; j < 5; ++j)
    if (detail::non_finite(r[j])) return false;
  if (!detail::roi_batch_index(r[0], lv.N, ctx.n)) return false;
  ctx.level = o.use_map ? detail::fpn_level<A>(r[1], r[2], r[3], r[4], o.k_min, o.k_max, o.canonical_level,
                                               A(o.canonical_scale), o.detectron2_levels)
                        : 0;
  if (ctx.level < 0 || ctx.level >= lv.count) return false;
  ctx.bins = detail::roi_bins<A>(r[1], r[2], r[3], r[4], A(lv.scale[ctx.level]), o.pooled_h, o.pooled_w,
                                 o.sampling_ratio, o.aligned, o.quantize);
  return true;
}

// Calls f(ly, lx) for every valid sample of bin (ph, pw) in (iy, ix) order.
template <class A, class F>
__device__ void for_each_sample(const detail::RoiBins<A>& b, int ph, int pw, int64_t H, int64_t W, F&& f) {
  int y0, y1, x0, x1;
  detail::sample_range(b.start_y, b.bin_h, ph, b.grid_h, H, y0, y1);
  detail::sample_range(b.start_x, b.bin_w, pw, b.grid_w, W, x0, x1);
  for (int iy = y0; iy < y1; ++iy) {
    Lerp<A> ly;
    if (!detail::bilinear_at(detail::sample_pos(b.start_y, b.bin_h, ph, iy, b.grid_h), H, ly)) continue;
    for (int ix = x0; ix < x1; ++ix) {
      Lerp<A> lx;
      if (!detail::bilinear_at(detail::sample_pos(b.start_x, b.bin_w, pw, ix, b.grid_w), W, lx)) continue;
      f(ly, lx);
    }
  }
}

template <class A> __device__ int count_valid(A start, A bin, int p, int grid, int64_t size) {
  int i0, i1, n = 0;
  detail::sample_range(start, bin, p, grid, size, i0, i1);
  Lerp<A> s;
  for (int i = i0; i < i1; ++i) n += detail::bilinear_at(detail::sample_pos(start, bin, p, i, grid), size, s);
  return n;
}

template <class T, class A>
__device__ __forceinline__ A sample_at(const T* p, int64_t sH, int64_t sW, const Lerp<A>& ly, const Lerp<A>& lx) {
  return detail::sample_value(ly, lx, cuda::to_acc(p[ly.lo * sH + lx.lo * sW]), cuda::to_acc(p[ly.lo * sH + lx.hi * sW]),
                              cuda::to_acc(p[ly.hi * sH + lx.lo * sW]), cuda::to_acc(p[ly.hi * sH + lx.hi * sW]));
}

// Max mode: arg-max sample of the bin (first in (iy, ix) order among equal values).
template <class T, class A>
__device__ bool max_sample(const T* p, int64_t sH, int64_t sW, int64_t H, int64_t W, const detail::RoiBins<A>& b,
                           int ph, int pw, A& best, Lerp<A>& by, Lerp<A>& bx) {
  bool found = false;
  best = -CUDART_INF_F;
  for_each_sample(b, ph, pw, H, W, [&](const Lerp<A>& ly, const Lerp<A>& lx) {
    const A v = sample_at<T, A>(p, sH, sW, ly, lx);
    if (v > best) {
      best = v;
      by = ly;
      bx = lx;
      found = true;
    }
  });
  const bool has_invalid = count_valid(b.start_y, b.bin_h, ph, b.grid_h, H) < b.grid_h ||
                           count_valid(b.start_x, b.bin_w, pw, b.grid_w, W) < b.grid_w;
  return detail::max_bin_takes_sample(found, best, has_invalid);
}

template <class T, class G>
__global__ void roi_align_forward_kernel(LevelArgs<T, G> lv, const typename cuda::Acc<T>::type* __restrict__ rois,
                                         int64_t K, KernelOpts o, T* __restrict__ out, int64_t oK, int64_t oC,
                                         int64_t oH, int64_t oW) {
  using A = typename cuda::Acc<T>::type;
  const int64_t total = K * lv.C * o.pooled_h * o.pooled_w;
  MRCNN_GRID_STRIDE(idx, total) {
    int64_t k, c;
    int ph, pw;
    decompose(idx, lv.C, o, k, c, ph, pw);
    A val = A(0);
    RoiCtx<A> ctx;
    if (roi_context(rois + 5 * k, lv, o, ctx)) {
      const int l = ctx.level;
      const T* p = lv.data[l] + ctx.n * lv.sN[l] + c * lv.sC[l];
      const int64_t sH = lv.sH[l], sW = lv.sW[l];
      if (o.max_mode) {
        A best;
        Lerp<A> by, bx;
        if (max_sample<T, A>(p, sH, sW, lv.H[l], lv.W[l], ctx.bins, ph, pw, best, by, bx)) val = best;
      } else {
        A acc = A(0);
        for_each_sample(ctx.bins, ph, pw, lv.H[l], lv.W[l],
                        [&](const Lerp<A>& ly, const Lerp<A>& lx) { acc += sample_at<T, A>(p, sH, sW, ly, lx); });
        val = acc / ctx.bins.count;
      }
    }
    out[k * oK + c * oC + ph * oH + pw * oW] = cuda::from_acc<T>(val);
  }
}

template <class G> __device__ __forceinline__ void add_corners(G* g, int64_t sH, int64_t sW, const Lerp<G>& ly,
                                                               const Lerp<G>& lx, G grad) {
  G w[4];
  detail::corner_weights(ly, lx, w);
  atomicAdd(g + ly.lo * sH + lx.lo * sW, grad * w[0]);
  atomicAdd(g + ly.lo * sH + lx.hi * sW, grad * w[1]);
  atomicAdd(g + ly.hi * sH + lx.lo * sW, grad * w[2]);
  atomicAdd(g + ly.hi * sH + lx.hi * sW, grad * w[3]);
}

template <class T, class G>
__global__ void roi_align_backward_kernel(LevelArgs<T, G> lv, const G* __restrict__ rois, int64_t K, KernelOpts o,
                                          const T* __restrict__ gout, int64_t gK, int64_t gC, int64_t gH,
                                          int64_t gW) {
  const int64_t total = K * lv.C * o.pooled_h * o.pooled_w;
  MRCNN_GRID_STRIDE(idx, total) {
    int64_t k, c;
    int ph, pw;
    decompose(idx, lv.C, o, k, c, ph, pw);
    RoiCtx<G> ctx;
    if (!roi_context(rois + 5 * k, lv, o, ctx)) continue;
    const int l = ctx.level;
    const int64_t off = ctx.n * lv.sN[l] + c * lv.sC[l];
    const int64_t sH = lv.sH[l], sW = lv.sW[l];
    G* g = lv.grad[l] + off;
    const G go = cuda::to_acc(gout[k * gK + c * gC + ph * gH + pw * gW]);
    if (o.max_mode) {
      G best;
      Lerp<G> by, bx;
      if (max_sample<T, G>(lv.data[l] + off, sH, sW, lv.H[l], lv.W[l], ctx.bins, ph, pw, best, by, bx))
        add_corners(g, sH, sW, by, bx, go);
    } else {
      const G gs = go / ctx.bins.count;
      for_each_sample(ctx.bins, ph, pw, lv.H[l], lv.W[l],
                      [&](const Lerp<G>& ly, const Lerp<G>& lx) { add_corners(g, sH, sW, ly, lx, gs); });
    }
  }
}

template <class B>
__global__ void fpn_level_assign_kernel(const B* __restrict__ boxes, int64_t K, int64_t width, FpnLevelMap map,
                                        int64_t* __restrict__ levels) {
  MRCNN_GRID_STRIDE(k, K) {
    const B* q = boxes + k * width + (width - 4);
    levels[k] = detail::fpn_level<B>(q[0], q[1], q[2], q[3], map.k_min, map.k_max, map.canonical_level,
                                     B(map.canonical_scale), map.detectron2);
  }
}

template <class T, class G> LevelArgs<T, G> level_args(const RoiLevels& lv, bool with_grad) {
  LevelArgs<T, G> a{};
  for (int l = 0; l < lv.count; ++l) {
    const TensorView& f = lv.feat[l];
    a.data[l] = f.ptr<T>();
    a.grad[l] = with_grad ? lv.grad[l].ptr<G>() : nullptr;
    a.H[l] = f.size(2);
    a.W[l] = f.size(3);
    a.sN[l] = f.stride(0);
    a.sC[l] = f.stride(1);
    a.sH[l] = f.stride(2);
    a.sW[l] = f.stride(3);
    a.scale[l] = lv.scale[l];
  }
  a.count = lv.count;
  a.N = lv.feat[0].size(0);
  a.C = lv.feat[0].size(1);
  return a;
}

KernelOpts kernel_opts(const RoiLevels& lv, const FpnLevelMap* map, const RoiAlignOptions& opt) {
  KernelOpts o{};
  o.pooled_h = static_cast<int>(opt.pooled_h);
  o.pooled_w = static_cast<int>(opt.pooled_w);
  o.sampling_ratio = static_cast<int>(std::min<int64_t>(opt.sampling_ratio, detail::kMaxRoiGrid));
  o.aligned = opt.aligned;
  o.max_mode = opt.mode == RoiPoolMode::Max;
  o.quantize = opt.quantize;
  o.use_map = map != nullptr;
  if (map) {
    o.k_min = map->k_min;
    o.k_max = map->k_max;
    o.canonical_level = map->canonical_level;
    o.canonical_scale = map->canonical_scale;
    o.detectron2_levels = map->detectron2;
  }
  o.channels_fastest = !lv.feat[0].is_contiguous();
  return o;
}

}  // namespace

void roi_align_forward_cuda(const RoiLevels& lv, const TensorView& rois, const FpnLevelMap* map,
                            const RoiAlignOptions& opt, const TensorView& out, Stream stream) {
  cuda::DeviceGuard guard(lv.feat[0].device_id);
  const KernelOpts o = kernel_opts(lv, map, opt);
  MRCNN_DISPATCH_CUDA_FLOAT(lv.feat[0].dtype, "roi_align", [&] {
    using A = typename cuda::Acc<scalar_t>::type;
    constexpr int threads = 256;
    roi_align_forward_kernel<scalar_t, A>
        <<<cuda::blocks_for(out.numel(), threads), threads, 0, cuda::as_stream(stream)>>>(
            level_args<scalar_t, A>(lv, false), rois.ptr<A>(), rois.size(0), o, out.ptr<scalar_t>(), out.stride(0),
            out.stride(1), out.stride(2), out.stride(3));
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void roi_align_backward_cuda(const TensorView& grad_out, const RoiLevels& lv, const TensorView& rois,
                             const FpnLevelMap* map, const RoiAlignOptions& opt, Stream stream) {
  cuda::DeviceGuard guard(lv.feat[0].device_id);
  const KernelOpts o = kernel_opts(lv, map, opt);
  for (int l = 0; l < lv.count; ++l) {
    // Dense (NCHW or channels-last) with the features' strides: the storage is one block.
    const TensorView& g = lv.grad[l];
    if (g.numel())
      MRCNN_CUDA_CHECK(cudaMemsetAsync(g.data, 0, size_t(g.numel()) * dtype_size(g.dtype), cuda::as_stream(stream)));
  }
  if (grad_out.numel() == 0) return;
  MRCNN_DISPATCH_CUDA_FLOAT(lv.feat[0].dtype, "roi_align_backward", [&] {
    using A = typename cuda::Acc<scalar_t>::type;
    constexpr int threads = 256;
    roi_align_backward_kernel<scalar_t, A>
        <<<cuda::blocks_for(grad_out.numel(), threads), threads, 0, cuda::as_stream(stream)>>>(
            level_args<scalar_t, A>(lv, true), rois.ptr<A>(), rois.size(0), o, grad_out.ptr<scalar_t>(),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3));
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

void fpn_level_assign_cuda(const TensorView& boxes, const FpnLevelMap& map, const TensorView& levels,
                           Stream stream) {
  cuda::DeviceGuard guard(boxes.device_id);
  const int64_t K = boxes.size(0);
  constexpr int threads = 256;
  const unsigned blocks = cuda::blocks_for(K, threads);
  if (boxes.dtype == DType::Float64) {
    fpn_level_assign_kernel<double><<<blocks, threads, 0, cuda::as_stream(stream)>>>(
        boxes.ptr<double>(), K, boxes.size(1), map, levels.ptr<int64_t>());
  } else {
    fpn_level_assign_kernel<float><<<blocks, threads, 0, cuda::as_stream(stream)>>>(
        boxes.ptr<float>(), K, boxes.size(1), map, levels.ptr<int64_t>());
  }
  MRCNN_CUDA_CHECK_LAUNCH();
}

}  // namespace mrcnn
