// Anchor grid on the CPU: cell anchors shifted over the feature grid, in the output dtype.
#include <algorithm>
#include <vector>

#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/anchors.h"
#include "mrcnn/ops/detail/anchor_math.h"

namespace mrcnn {

void grid_anchors_cpu(const float* cells, int A, int64_t stride_h, int64_t stride_w, const TensorView& out) {
  const int64_t H = out.size(0), W = out.size(1);
  MRCNN_DISPATCH_CPU_FLOAT(out.dtype, "grid_anchors", [&] {
    std::vector<scalar_t> cell(static_cast<size_t>(4 * A));
    for (int i = 0; i < 4 * A; ++i) cell[i] = static_cast<scalar_t>(cells[i]);
    scalar_t* o = out.ptr<scalar_t>();
    parallel_for(0, H, std::max<int64_t>(1, 16384 / std::max<int64_t>(W * A * 4, 1)), [&](int64_t y0, int64_t y1) {
      for (int64_t y = y0; y < y1; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          scalar_t shift[4];
          for (int j = 0; j < 4; ++j) shift[j] = static_cast<scalar_t>(detail::anchor_shift(j, x, y, stride_h, stride_w));
          scalar_t* __restrict__ row = o + (y * W + x) * 4 * A;
          for (int a = 0; a < A; ++a)
            for (int j = 0; j < 4; ++j) row[4 * a + j] = shift[j] + cell[4 * a + j];
        }
      }
    });
  });
}

}  // namespace mrcnn
