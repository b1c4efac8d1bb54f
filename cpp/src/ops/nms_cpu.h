#pragma once
// CPU building blocks shared by nms_cpu.cpp and proposals_cpu.cpp: a stable LSD radix sort, top-k
// selection on score keys, and the greedy suppression pass over boxes in structure-of-arrays form.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mrcnn {
namespace cpu {

// Stable ascending sort of (keys, vals) by key, 8 bits per pass; passes in which every key has the
// same digit are skipped (small class ids sort in one pass). tmp_* have n elements. The result is in
// keys/vals.
template <class K, class V>
void radix_sort_pairs(K* keys, V* vals, int64_t n, K* tmp_k, V* tmp_v) {
  constexpr int kPasses = sizeof(K);
  if (n <= 1) return;
  std::vector<uint32_t> hist(kPasses * 256, 0);
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    for (int p = 0; p < kPasses; ++p) ++hist[p * 256 + ((k >> (8 * p)) & 0xff)];
  }
  K* src_k = keys;
  V* src_v = vals;
  K* dst_k = tmp_k;
  V* dst_v = tmp_v;
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* h = hist.data() + p * 256;
    const K first_digit = (keys[0] >> (8 * p)) & 0xff;
    if (h[first_digit] == static_cast<uint32_t>(n)) continue;
    uint32_t sum = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t c = h[d];
      h[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t pos = h[(src_k[i] >> (8 * p)) & 0xff]++;
      dst_k[pos] = src_k[i];
      dst_v[pos] = src_v[i];
    }
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  if (src_k != keys) {
    std::memcpy(keys, src_k, sizeof(K) * n);
    std::memcpy(vals, src_v, sizeof(V) * n);
  }
}

// Candidates in visiting order, one array per coordinate so the IoU loops vectorise. The greedy pass
// compacts them in place.
template <class T> struct BoxSpan {
  T* x1;
  T* y1;
  T* x2;
  T* y2;
  T* area;
  int32_t* id;
};

template <class T> struct BoxStore {
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<int32_t> id;
  void resize(int64_t n) {
    x1.resize(n), y1.resize(n), x2.resize(n), y2.resize(n), area.resize(n), id.resize(n);
  }
  BoxSpan<T> span(int64_t offset = 0) {
    return {x1.data() + offset, y1.data() + offset, x2.data() + offset,
            y2.data() + offset, area.data() + offset, id.data() + offset};
  }
};

// Greedy NMS over m candidates already in visiting order (score descending): a candidate is kept
// unless a kept one overlaps it with IoU > thr (thr in the form of detail::threshold_below). Classes
// are handled by the callers (one call per class). Writes the ids of the kept candidates, in order, to
// `kept` and returns how many (at most max_out). flags: scratch of m bytes. The span is compacted in
// place. `parallel`: large sweeps may use the thread pool (false when the caller already runs inside
// a parallel_for).
template <class T>
int64_t greedy_nms(BoxSpan<T> c, int64_t m, T thr, int64_t max_out, int32_t* kept, uint8_t* flags, bool parallel);

extern template int64_t greedy_nms<float>(BoxSpan<float>, int64_t, float, int64_t, int32_t*, uint8_t*, bool);
extern template int64_t greedy_nms<double>(BoxSpan<double>, int64_t, double, int64_t, int32_t*, uint8_t*, bool);

}  // namespace cpu
}  // namespace mrcnn
