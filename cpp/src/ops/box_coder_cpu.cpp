// Box coding on the CPU: one box per iteration, math in detail/box_coder_math.h.
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/box_coder.h"
#include "mrcnn/ops/detail/box_coder_math.h"

namespace mrcnn {
namespace {

constexpr int64_t kGrain = 8192;  // boxes per task: the per-box work is a few dozen flops

}  // namespace

void encode_boxes_cpu(const TensorView& ref, const TensorView& prop, const BoxCoderParams& p, const TensorView& out) {
  MRCNN_DISPATCH_CPU_FLOAT(ref.dtype, "encode_boxes", [&] {
    const auto cp = detail::coder_params<scalar_t>(p);
    const scalar_t* r = ref.ptr<scalar_t>();
    const scalar_t* q = prop.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    parallel_for(0, ref.size(0), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) detail::encode_box(r + 4 * i, q + 4 * i, cp, o + 4 * i);
    });
  });
}

void decode_boxes_cpu(const TensorView& deltas, const TensorView& boxes, const BoxCoderParams& p,
                      const TensorView& out) {
  const int64_t n = boxes.size(0), k = deltas.size(1) / 4;
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "decode_boxes", [&] {
    const auto cp = detail::coder_params<scalar_t>(p);
    const scalar_t* d = deltas.ptr<scalar_t>();
    const scalar_t* bx = boxes.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    parallel_for(0, n * k, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) detail::decode_box(d + 4 * i, bx + 4 * (i / k), cp, o + 4 * i);
    });
  });
}

void clip_boxes_cpu(const TensorView& boxes, double height, double width, const TensorView& out) {
  const int64_t n = boxes.numel() / 4;
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "clip_boxes", [&] {
    const scalar_t h = scalar_t(height), w = scalar_t(width);
    const scalar_t* bx = boxes.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    parallel_for(0, n, 4 * kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t t[4] = {bx[4 * i], bx[4 * i + 1], bx[4 * i + 2], bx[4 * i + 3]};
        detail::clip_box(t, h, w);
        for (int c = 0; c < 4; ++c) o[4 * i + c] = t[c];
      }
    });
  });
}

void box_size_mask_cpu(const TensorView& boxes, double min_size, const TensorView& keep) {
  const int64_t n = boxes.size(0);
  MRCNN_DISPATCH_CPU_FLOAT(boxes.dtype, "remove_small_boxes", [&] {
    const scalar_t m = scalar_t(min_size);
    const scalar_t* bx = boxes.ptr<scalar_t>();
    bool* k = keep.ptr<bool>();
    for (int64_t i = 0; i < n; ++i) k[i] = detail::box_big_enough(bx + 4 * i, m);
  });
}

}  // namespace mrcnn
