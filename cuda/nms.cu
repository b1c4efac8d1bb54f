// NMS on the device without host synchronisation: stable radix sort of the scores (cub), gather of
// the boxes in score order, IoU bitmask, single-block greedy reduction, and a final kernel that maps
// the kept positions back to input indices and pads keep with -1.
#include <type_traits>

#include "launch.cuh"
#include "mrcnn/ops/nms.h"
#include "nms_kernels.cuh"

namespace mrcnn {
namespace {

template <class T> using acc_t = typename cuda::Acc<T>::type;
template <class T> using key_t = std::conditional_t<std::is_same<acc_t<T>, double>::value, uint64_t, uint32_t>;

template <class T>
__global__ void score_keys_kernel(const T* __restrict__ scores, int64_t n, key_t<T>* __restrict__ keys,
                                  uint32_t* __restrict__ vals) {
  MRCNN_GRID_STRIDE(i, n) {
    keys[i] = detail::desc_key(cuda::to_acc(scores[i]));
    vals[i] = static_cast<uint32_t>(i);
  }
}

template <class T>
__global__ void gather_boxes_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ idxs,
                                    const uint32_t* __restrict__ order, int64_t n, acc_t<T>* __restrict__ out,
                                    int64_t* __restrict__ cls_out) {
  MRCNN_GRID_STRIDE(p, n) {
    const int64_t i = order[p];
    for (int c = 0; c < 4; ++c) out[4 * p + c] = cuda::to_acc(boxes[4 * i + c]);
    if (idxs) cls_out[p] = idxs[i];
  }
}

__global__ void finalize_keep_kernel(const uint32_t* __restrict__ order, const int32_t* __restrict__ kept,
                                     const int64_t* __restrict__ kept_count, int64_t max_out,
                                     int64_t* __restrict__ keep, int64_t* __restrict__ count) {
  const int64_t cnt = *kept_count;
  MRCNN_GRID_STRIDE(t, max_out)
    keep[t] = t < cnt ? static_cast<int64_t>(order[kept[t]]) : int64_t(-1);
  if (blockIdx.x == 0 && threadIdx.x == 0) *count = cnt;
}

// Everything the device path needs, carved from one workspace (sizes only, with base == nullptr).
template <class K, class A> struct NmsScratch {
  K *keys_in, *keys_out;
  uint32_t *vals_in, *vals_out;
  A* boxes;
  int64_t* cls;
  uint64_t* mask;
  int32_t* kept;
  int64_t* kept_count;
  void* sort_temp;
  int64_t sort_bytes;

  NmsScratch(cuda::Carver& cv, int64_t n, bool batched) {
    keys_in = cv.take<K>(n);
    keys_out = cv.take<K>(n);
    vals_in = cv.take<uint32_t>(n);
    vals_out = cv.take<uint32_t>(n);
    boxes = cv.take<A>(4 * n);
    cls = batched ? cv.take<int64_t>(n) : nullptr;
    mask = cv.take<uint64_t>(n * cuda::mask_words(n));
    kept = cv.take<int32_t>(n);
    kept_count = cv.take<int64_t>(1);
    sort_bytes = cuda::sort_temp_bytes<K>(n);
    sort_temp = cv.take<char>(sort_bytes);
  }
};

template <class T> int64_t workspace_bytes(int64_t n, bool batched) {
  cuda::Carver cv;
  NmsScratch<key_t<T>, acc_t<T>> s(cv, n, batched);
  return cv.used;
}

}  // namespace

int64_t nms_cuda_workspace_bytes(int64_t n, DType dtype, bool batched) {
  if (n <= 0) return 0;
  return MRCNN_DISPATCH_CUDA_FLOAT(dtype, "nms", [&] { return workspace_bytes<scalar_t>(n, batched); });
}

void nms_cuda(const TensorView& boxes, const TensorView& scores, const TensorView* idxs, double iou_threshold,
              const TensorView& keep, const TensorView& count, const TensorView& workspace, Stream stream) {
  cuda::DeviceGuard guard(boxes.device_id);
  const cudaStream_t st = cuda::as_stream(stream);
  const int64_t n = boxes.size(0), max_out = keep.size(0);
  if (n == 0 || max_out == 0) {
    // 0xff bytes are -1 in int64.
    if (max_out > 0) MRCNN_CUDA_CHECK(cudaMemsetAsync(keep.data, 0xff, max_out * sizeof(int64_t), st));
    MRCNN_CUDA_CHECK(cudaMemsetAsync(count.data, 0, sizeof(int64_t), st));
    return;
  }
  MRCNN_CHECK_VALUE(n <= cuda::kMaxSegmentBoxes, "nms on CUDA supports at most ", cuda::kMaxSegmentBoxes,
                    " boxes, got ", n);
  MRCNN_DISPATCH_CUDA_FLOAT(boxes.dtype, "nms", [&] {
    using A = acc_t<scalar_t>;
    using K = key_t<scalar_t>;
    cuda::Carver cv{static_cast<char*>(workspace.data)};
    NmsScratch<K, A> s(cv, n, idxs != nullptr);
    constexpr int threads = 256;
    const unsigned blocks = cuda::blocks_for(n, threads);
    score_keys_kernel<scalar_t><<<blocks, threads, 0, st>>>(scores.ptr<scalar_t>(), n, s.keys_in, s.vals_in);
    MRCNN_CUDA_CHECK_LAUNCH();
    cuda::sort_pairs<K>(s.sort_temp, s.sort_bytes, s.keys_in, s.keys_out, s.vals_in, s.vals_out, n, 8 * sizeof(K), st);
    gather_boxes_kernel<scalar_t><<<blocks, threads, 0, st>>>(
        boxes.ptr<scalar_t>(), idxs ? idxs->ptr<int64_t>() : nullptr, s.vals_out, n, s.boxes, s.cls);
    MRCNN_CUDA_CHECK_LAUNCH();
    const int64_t cap = std::min(n, max_out);
    cuda::launch_nms_segments(s.boxes, std::is_same<A, double>::value, s.cls, 1, n, n, iou_threshold, nullptr, cap,
                              s.mask, s.kept, s.kept_count, st);
    finalize_keep_kernel<<<cuda::blocks_for(max_out, threads), threads, 0, st>>>(
        s.vals_out, s.kept, s.kept_count, max_out, keep.ptr<int64_t>(), count.ptr<int64_t>());
    MRCNN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mrcnn
