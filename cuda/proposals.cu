// RPN proposal generation on the device, fixed-size outputs, no host synchronisation:
//  1. top-k per (image, level): a stable radix sort of all logits by value, then a stable sort by
//     segment id (LSD order: segments come out contiguous, sorted by descending logit, ties by index);
//  2. decode / clip / size and score tests for the top-k of every segment;
//  3. bitmask NMS of all segments in one launch (nms_kernels.cuh), capped at post_nms_top_n;
//  4. merge per image: stable sort of the kept (score, position) pairs by score, then by image;
//  5. the first post_nms_top_n of every image go to the outputs, the rest is zero.
#include <algorithm>
#include <type_traits>

#include "launch.cuh"
#include "mrcnn/ops/detail/box_coder_math.h"
#include "mrcnn/ops/proposals.h"
#include "nms_kernels.cuh"

namespace mrcnn {
namespace {

template <class T> using acc_t = typename cuda::Acc<T>::type;
template <class T> using key_t = std::conditional_t<std::is_same<acc_t<T>, double>::value, uint64_t, uint32_t>;

constexpr int kMaxLevels = 16;
constexpr int kThreads = 256;

// Passed by value as a kernel argument: no host-to-device copy.
template <class T> struct Levels {
  const T* obj[kMaxLevels];
  const T* del[kMaxLevels];
  const T* anc[kMaxLevels];
  int64_t size[kMaxLevels];    // R_l
  int64_t offset[kMaxLevels];  // sum of R of the levels before
  int64_t k[kMaxLevels];       // min(pre_nms_top_n, R_l)
  int num;
  int64_t total;  // sum of R_l
  int64_t kmax;   // max k_l: candidate slots per segment
  int64_t cap;    // min(post_nms_top_n, kmax): kept slots per segment
};

template <class T> __device__ __forceinline__ int level_of(const Levels<T>& lv, int64_t q) {
  int l = 0;
  while (l + 1 < lv.num && lv.offset[l + 1] <= q) ++l;
  return l;
}

template <class T>
__global__ void logit_keys_kernel(Levels<T> lv, int64_t nimg, key_t<T>* __restrict__ keys, uint32_t* __restrict__ vals) {
  MRCNN_GRID_STRIDE(p, nimg * lv.total) {
    const int64_t n = p / lv.total, q = p % lv.total;
    const int l = level_of(lv, q);
    keys[p] = detail::desc_key(cuda::to_acc(lv.obj[l][n * lv.size[l] + (q - lv.offset[l])]));
    vals[p] = static_cast<uint32_t>(p);
  }
}

template <class T>
__global__ void segment_keys_kernel(Levels<T> lv, int64_t count, const uint32_t* __restrict__ vals,
                                    uint32_t* __restrict__ seg) {
  MRCNN_GRID_STRIDE(q, count) {
    const int64_t p = vals[q];
    seg[q] = static_cast<uint32_t>((p / lv.total) * lv.num + level_of(lv, p % lv.total));
  }
}

template <class T>
__global__ void decode_candidates_kernel(Levels<T> lv, int64_t nimg, const uint32_t* __restrict__ top,
                                         const double* __restrict__ image_sizes, detail::CoderParams<acc_t<T>> cp,
                                         acc_t<T> min_size, acc_t<T> score_thresh, acc_t<T>* __restrict__ boxes,
                                         acc_t<T>* __restrict__ scores, uint8_t* __restrict__ valid) {
  using A = acc_t<T>;
  MRCNN_GRID_STRIDE(slot, nimg * lv.num * lv.kmax) {
    const int64_t s = slot / lv.kmax, r = slot % lv.kmax;
    const int64_t n = s / lv.num;
    const int l = static_cast<int>(s % lv.num);
    A* b = boxes + 4 * slot;
    if (r >= lv.k[l]) {
      b[0] = b[1] = b[2] = b[3] = A(0);
      scores[slot] = A(0);
      valid[slot] = 0;
      continue;
    }
    const int64_t base = n * lv.total + lv.offset[l];
    const int64_t i = static_cast<int64_t>(top[base + r]) - base;
    const int64_t row = n * lv.size[l] + i;
    A d[4], a[4];
    for (int c = 0; c < 4; ++c) {
      d[c] = cuda::to_acc(lv.del[l][4 * row + c]);
      a[c] = cuda::to_acc(lv.anc[l][4 * i + c]);
    }
    detail::decode_box(d, a, cp, b);
    detail::clip_box(b, A(image_sizes[2 * n]), A(image_sizes[2 * n + 1]));
    const A score = detail::sigmoid(cuda::to_acc(lv.obj[l][row]));
    scores[slot] = score;
    valid[slot] = detail::proposal_big_enough(b, min_size) && score >= score_thresh;
  }
}

template <class T>
__global__ void merge_keys_kernel(Levels<T> lv, int64_t nimg, const acc_t<T>* __restrict__ scores,
                                  const int32_t* __restrict__ kept, const int64_t* __restrict__ kept_count,
                                  key_t<T>* __restrict__ keys, uint32_t* __restrict__ vals) {
  MRCNN_GRID_STRIDE(e, nimg * lv.num * lv.cap) {
    const int64_t s = e / lv.cap, t = e % lv.cap;
    // Empty slots sort after every real score (sigmoid outputs never map to the all-ones key).
    keys[e] = t < kept_count[s] ? detail::desc_key(scores[s * lv.kmax + kept[s * lv.cap + t]]) : ~key_t<T>(0);
    vals[e] = static_cast<uint32_t>(e);
  }
}

template <class T>
__global__ void image_keys_kernel(Levels<T> lv, int64_t count, const uint32_t* __restrict__ vals,
                                  uint32_t* __restrict__ img) {
  MRCNN_GRID_STRIDE(q, count) { img[q] = static_cast<uint32_t>(vals[q] / (lv.cap * lv.num)); }
}

template <class T>
__global__ void write_outputs_kernel(Levels<T> lv, int64_t nimg, int64_t post, const uint32_t* __restrict__ order,
                                     const acc_t<T>* __restrict__ cand_boxes, const acc_t<T>* __restrict__ cand_scores,
                                     const int32_t* __restrict__ kept, const int64_t* __restrict__ kept_count,
                                     T* __restrict__ boxes, T* __restrict__ scores, int64_t* __restrict__ counts) {
  using A = acc_t<T>;
  MRCNN_GRID_STRIDE(o, nimg * post) {
    const int64_t n = o / post, r = o % post;
    int64_t total = 0;
    for (int l = 0; l < lv.num; ++l) total += kept_count[n * lv.num + l];
    total = min(total, post);
    if (r == 0) counts[n] = total;
    A b[4] = {A(0), A(0), A(0), A(0)}, sc = A(0);
    if (r < total) {
      const int64_t e = order[n * lv.num * lv.cap + r];
      const int64_t s = e / lv.cap, t = e % lv.cap;
      const int64_t slot = s * lv.kmax + kept[s * lv.cap + t];
      for (int c = 0; c < 4; ++c) b[c] = cand_boxes[4 * slot + c];
      sc = cand_scores[slot];
    }
    for (int c = 0; c < 4; ++c) boxes[4 * o + c] = cuda::from_acc<T>(b[c]);
    scores[o] = cuda::from_acc<T>(sc);
  }
}

struct Shape {
  int64_t nimg, levels, total, kmax, cap;
  int64_t segments() const { return nimg * levels; }
};

Shape shape_of(const std::vector<int64_t>& sizes, int64_t nimg, const ProposalParams& p) {
  Shape sh{nimg, static_cast<int64_t>(sizes.size()), 0, 0, 0};
  for (int64_t r : sizes) {
    sh.total += r;
    sh.kmax = std::max(sh.kmax, std::min(p.pre_nms_top_n, r));
  }
  sh.cap = std::min(p.post_nms_top_n, sh.kmax);
  return sh;
}

template <class K, class A> struct ProposalScratch {
  K *keys_a, *keys_b;
  uint32_t *seg_a, *seg_b, *vals_a, *vals_b;
  A *cand_boxes, *cand_scores;
  uint8_t* valid;
  uint64_t* mask;
  int32_t* kept;
  int64_t* kept_count;
  K *mkeys_a, *mkeys_b;
  uint32_t *mimg_a, *mimg_b, *mvals_a, *mvals_b;
  void* sort_temp;
  int64_t sort_bytes;
  int seg_bits, img_bits;

  ProposalScratch(cuda::Carver& cv, const Shape& sh) {
    const int64_t all = sh.nimg * sh.total, slots = sh.segments() * sh.kmax, merged = sh.segments() * sh.cap;
    keys_a = cv.take<K>(all), keys_b = cv.take<K>(all);
    seg_a = cv.take<uint32_t>(all), seg_b = cv.take<uint32_t>(all);
    vals_a = cv.take<uint32_t>(all), vals_b = cv.take<uint32_t>(all);
    cand_boxes = cv.take<A>(4 * slots), cand_scores = cv.take<A>(slots);
    valid = cv.take<uint8_t>(slots);
    mask = cv.take<uint64_t>(slots * cuda::mask_words(sh.kmax));
    kept = cv.take<int32_t>(merged);
    kept_count = cv.take<int64_t>(sh.segments());
    mkeys_a = cv.take<K>(merged), mkeys_b = cv.take<K>(merged);
    mimg_a = cv.take<uint32_t>(merged), mimg_b = cv.take<uint32_t>(merged);
    mvals_a = cv.take<uint32_t>(merged), mvals_b = cv.take<uint32_t>(merged);
    seg_bits = cuda::bits_for(sh.segments());
    img_bits = cuda::bits_for(sh.nimg);
    sort_bytes = std::max({cuda::sort_temp_bytes<K>(all), cuda::sort_temp_bytes<uint32_t>(all, seg_bits),
                           cuda::sort_temp_bytes<K>(merged), cuda::sort_temp_bytes<uint32_t>(merged, img_bits)});
    sort_temp = cv.take<char>(sort_bytes);
  }
};

template <class T> int64_t workspace_bytes(const Shape& sh) {
  if (sh.total == 0 || sh.kmax == 0 || sh.cap == 0) return 0;
  cuda::Carver cv;
  ProposalScratch<key_t<T>, acc_t<T>> s(cv, sh);
  return cv.used;
}

template <class T>
void run(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes, const ProposalParams& p,
         const TensorView& boxes, const TensorView& scores, const TensorView& counts, const TensorView& workspace,
         const Shape& sh, cudaStream_t st) {
  using A = acc_t<T>;
  using K = key_t<T>;
  Levels<T> lv{};
  lv.num = static_cast<int>(sh.levels);
  for (int l = 0; l < lv.num; ++l) {
    lv.obj[l] = levels[l].objectness.ptr<T>();
    lv.del[l] = levels[l].deltas.ptr<T>();
    lv.anc[l] = levels[l].anchors.ptr<T>();
    lv.size[l] = levels[l].objectness.size(1);
    lv.offset[l] = l ? lv.offset[l - 1] + lv.size[l - 1] : 0;
    lv.k[l] = std::min(p.pre_nms_top_n, lv.size[l]);
  }
  lv.total = sh.total, lv.kmax = sh.kmax, lv.cap = sh.cap;
  cuda::Carver cv{static_cast<char*>(workspace.data)};
  ProposalScratch<K, A> s(cv, sh);
  const int64_t all = sh.nimg * sh.total, slots = sh.segments() * sh.kmax, merged = sh.segments() * sh.cap;

  logit_keys_kernel<T><<<cuda::blocks_for(all, kThreads), kThreads, 0, st>>>(lv, sh.nimg, s.keys_a, s.vals_a);
  MRCNN_CUDA_CHECK_LAUNCH();
  cuda::sort_pairs<K>(s.sort_temp, s.sort_bytes, s.keys_a, s.keys_b, s.vals_a, s.vals_b, all, 8 * sizeof(K), st);
  segment_keys_kernel<T><<<cuda::blocks_for(all, kThreads), kThreads, 0, st>>>(lv, all, s.vals_b, s.seg_a);
  MRCNN_CUDA_CHECK_LAUNCH();
  cuda::sort_pairs<uint32_t>(s.sort_temp, s.sort_bytes, s.seg_a, s.seg_b, s.vals_b, s.vals_a, all, s.seg_bits, st);

  const detail::CoderParams<A> cp = detail::coder_params<A>(p.coder);
  decode_candidates_kernel<T><<<cuda::blocks_for(slots, kThreads), kThreads, 0, st>>>(
      lv, sh.nimg, s.vals_a, image_sizes.ptr<double>(), cp, A(p.min_size), A(p.score_thresh), s.cand_boxes,
      s.cand_scores, s.valid);
  MRCNN_CUDA_CHECK_LAUNCH();
  cuda::launch_nms_segments(s.cand_boxes, std::is_same<A, double>::value, nullptr, sh.segments(), sh.kmax, sh.kmax,
                            p.nms_thresh, s.valid, sh.cap, s.mask, s.kept, s.kept_count, st);

  merge_keys_kernel<T><<<cuda::blocks_for(merged, kThreads), kThreads, 0, st>>>(
      lv, sh.nimg, s.cand_scores, s.kept, s.kept_count, s.mkeys_a, s.mvals_a);
  MRCNN_CUDA_CHECK_LAUNCH();
  cuda::sort_pairs<K>(s.sort_temp, s.sort_bytes, s.mkeys_a, s.mkeys_b, s.mvals_a, s.mvals_b, merged, 8 * sizeof(K),
                      st);
  image_keys_kernel<T><<<cuda::blocks_for(merged, kThreads), kThreads, 0, st>>>(lv, merged, s.mvals_b, s.mimg_a);
  MRCNN_CUDA_CHECK_LAUNCH();
  cuda::sort_pairs<uint32_t>(s.sort_temp, s.sort_bytes, s.mimg_a, s.mimg_b, s.mvals_b, s.mvals_a, merged, s.img_bits,
                             st);
  const int64_t post = p.post_nms_top_n;
  write_outputs_kernel<T><<<cuda::blocks_for(sh.nimg * post, kThreads), kThreads, 0, st>>>(
      lv, sh.nimg, post, s.mvals_a, s.cand_boxes, s.cand_scores, s.kept, s.kept_count, boxes.ptr<T>(),
      scores.ptr<T>(), counts.ptr<int64_t>());
  MRCNN_CUDA_CHECK_LAUNCH();
}

}  // namespace

int64_t proposals_cuda_workspace_bytes(const std::vector<int64_t>& level_sizes, int64_t num_images, DType dtype,
                                       const ProposalParams& p) {
  const Shape sh = shape_of(level_sizes, num_images, p);
  if (num_images <= 0) return 0;
  return MRCNN_DISPATCH_CUDA_FLOAT(dtype, "generate_proposals", [&] { return workspace_bytes<scalar_t>(sh); });
}

void generate_proposals_cuda(const std::vector<ProposalLevel>& levels, const TensorView& image_sizes,
                             const ProposalParams& p, const TensorView& boxes, const TensorView& scores,
                             const TensorView& counts, const TensorView& workspace, Stream stream) {
  cuda::DeviceGuard guard(levels[0].objectness.device_id);
  const cudaStream_t st = cuda::as_stream(stream);
  std::vector<int64_t> sizes;
  for (const ProposalLevel& l : levels) sizes.push_back(l.objectness.size(1));
  const int64_t nimg = counts.size(0);
  const Shape sh = shape_of(sizes, nimg, p);
  MRCNN_CHECK_VALUE(nimg * sh.total < (int64_t(1) << 31), "generate_proposals on CUDA supports fewer than 2^31 "
                    "anchors over the batch, got ", nimg * sh.total);
  MRCNN_CHECK_VALUE(sh.segments() <= 65535, "generate_proposals on CUDA supports at most 65535 images x levels, got ",
                    sh.segments());
  MRCNN_CHECK_VALUE(sh.kmax <= cuda::kMaxSegmentBoxes, "pre_nms_top_n must be <= ", cuda::kMaxSegmentBoxes,
                    " on CUDA, got ", p.pre_nms_top_n);
  if (sh.total == 0 || sh.kmax == 0 || sh.cap == 0) {
    // Nothing survives: zero boxes and scores (all-zero bits are 0.0 in every float type), zero counts.
    const int64_t post = p.post_nms_top_n;
    const int64_t es = dtype_size(boxes.dtype);
    if (post > 0) {
      MRCNN_CUDA_CHECK(cudaMemsetAsync(boxes.data, 0, nimg * post * 4 * es, st));
      MRCNN_CUDA_CHECK(cudaMemsetAsync(scores.data, 0, nimg * post * es, st));
    }
    MRCNN_CUDA_CHECK(cudaMemsetAsync(counts.data, 0, nimg * sizeof(int64_t), st));
    return;
  }
  MRCNN_DISPATCH_CUDA_FLOAT(boxes.dtype, "generate_proposals", [&] {
    run<scalar_t>(levels, image_sizes, p, boxes, scores, counts, workspace, sh, st);
  });
}

}  // namespace mrcnn
