// Pairwise box IoU on the CPU.
#include <algorithm>

#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/boxes.h"
#include "mrcnn/ops/detail/box_math.h"

namespace mrcnn {

void box_iou_cpu(const TensorView& b1, const TensorView& b2, const TensorView& out) {
  const int64_t N = b1.size(0), M = b2.size(0);
  MRCNN_DISPATCH_CPU_FLOAT(b1.dtype, "box_iou", [&] {
    const scalar_t* p1 = b1.ptr<scalar_t>();
    const scalar_t* p2 = b2.ptr<scalar_t>();
    scalar_t* o = out.ptr<scalar_t>();
    parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < M; ++j) o[i * M + j] = detail::box_iou(p1 + 4 * i, p2 + 4 * j);
    });
  });
}

}  // namespace mrcnn
