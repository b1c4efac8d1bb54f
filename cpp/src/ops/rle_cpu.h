#pragma once
// Run-length accumulation shared by the RLE encoders (rle_cpu.cpp) and the mask paste's RLE output
// (mask_paste_cpu.cpp). Runs are column-major and alternate between 0 and 1, starting with 0.
#include <cstdint>
#include <cstring>
#include <vector>

namespace mrcnn {
namespace cpu {

class RunLengths {
 public:
  explicit RunLengths(std::vector<uint64_t>& counts) : counts_(&counts) { counts.clear(); }

  // n pixels of value bit (0 or 1).
  void add(uint8_t bit, uint64_t n) {
    if (n == 0) return;
    if (bit != cur_) {
      counts_->push_back(run_);
      run_ = 0;
      cur_ = bit;
    }
    run_ += n;
  }

  // A column of n 0/1 bytes, compared 8 at a time against the current run's value.
  void column(const uint8_t* c, int64_t n) {
    int64_t i = 0;
    while (i < n) {
      const uint64_t pattern = cur_ ? 0x0101010101010101ull : 0;
      int64_t j = i;
      for (; j + 8 <= n; j += 8) {
        uint64_t w;
        std::memcpy(&w, c + j, 8);
        if (w != pattern) break;
      }
      while (j < n && c[j] == cur_) ++j;
      run_ += static_cast<uint64_t>(j - i);
      i = j;
      if (i < n) {
        counts_->push_back(run_);
        run_ = 0;
        cur_ ^= 1;
      }
    }
  }

  // Closes the last run; the counts are then complete.
  void finish() { counts_->push_back(run_); }

 private:
  std::vector<uint64_t>* counts_;
  uint64_t run_ = 0;
  uint8_t cur_ = 0;
};

}  // namespace cpu
}  // namespace mrcnn
