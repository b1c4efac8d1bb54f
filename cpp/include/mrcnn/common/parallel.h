#pragma once
// A small persistent thread pool for the CPU kernels (no OpenMP, so the core embeds cleanly next to
// torch's own runtime). parallel_for splits [begin, end) into contiguous chunks of at least `grain`
// elements; calls nested inside a worker, or made while the pool is busy, run inline.
#include <cstdint>
#include <functional>

namespace mrcnn {

int get_num_threads();
void set_num_threads(int n);  // n <= 0: hardware concurrency
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace mrcnn
