// COCO RLE on the CPU: counts strings from whole binary masks (rle_encode) and from windowed crops
// (rle_from_crops), one mask per task.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "mrcnn/common/parallel.h"
#include "mrcnn/ops/rle.h"
#include "rle_cpu.h"

namespace mrcnn {
namespace {

// One count of pycocotools' rleToString: 5-bit groups, low first, + 48, with 0x20 set on every group but the
// last (the last group's bit 0x10 is the sign).
void put_count(long long x, std::string& s) {
  bool more = true;
  while (more) {
    long long c = x & 0x1f;
    x >>= 5;  // arithmetic shift: negative deltas end at -1
    more = (c & 0x10) ? x != -1 : x != 0;
    if (more) c |= 0x20;
    s.push_back(static_cast<char>(c + 48));
  }
}

}  // namespace

// From the 4th count on, each is stored as the difference to the count two before.
std::string rle_counts_string(const std::vector<uint64_t>& counts) {
  std::string s;
  s.reserve(counts.size() * 2 + 4);
  for (size_t i = 0; i < counts.size(); ++i) {
    long long x = static_cast<long long>(counts[i]);
    if (i > 2) x -= static_cast<long long>(counts[i - 2]);
    put_count(x, s);
  }
  return s;
}

std::vector<std::string> rle_from_crops_cpu(const TensorView& crops, const TensorView& windows, int64_t img_h,
                                            int64_t img_w, bool outside) {
  const int64_t N = windows.size(0);
  const int64_t* w = windows.ptr<const int64_t>();
  const uint8_t* c = crops.ptr<const uint8_t>();
  std::vector<std::string> out(static_cast<size_t>(N));
  parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<uint64_t> counts;
    for (int64_t i = b; i < e; ++i) {
      const int64_t y0 = w[5 * i], x0 = w[5 * i + 1], h = w[5 * i + 2], wd = w[5 * i + 3], off = w[5 * i + 4];
      cpu::RunLengths runs(counts);
      const uint8_t z = outside ? 1 : 0;
      if (h > 0 && wd > 0) {
        runs.add(z, static_cast<uint64_t>(x0 * img_h));
        for (int64_t k = 0; k < wd; ++k) {  // crops are column-major: RLE order
          runs.add(z, static_cast<uint64_t>(y0));
          runs.column(c + off + k * h, h);
          runs.add(z, static_cast<uint64_t>(img_h - y0 - h));
        }
        runs.add(z, static_cast<uint64_t>((img_w - x0 - wd) * img_h));
      } else {
        runs.add(z, static_cast<uint64_t>(img_h * img_w));
      }
      runs.finish();
      out[i] = rle_counts_string(counts);
    }
  });
  return out;
}

std::vector<std::string> rle_encode_cpu(const TensorView& masks) {
  const int64_t N = masks.size(0), H = masks.size(1), W = masks.size(2);
  std::vector<std::string> out(static_cast<size_t>(N));
  const uint8_t* base = masks.ptr<const uint8_t>();
  parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> colany(static_cast<size_t>(W)), col(static_cast<size_t>(H));
    std::vector<uint64_t> counts;
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* m = base + n * H * W;
      // Bounding rows and columns of the set pixels: one pass over the mask, 8 bytes at a time; only that
      // box is then scanned column by column.
      std::fill(colany.begin(), colany.end(), uint8_t(0));
      int64_t ry0 = H, ry1 = -1;
      const int64_t W8 = W / 8;
      for (int64_t y = 0; y < H; ++y) {
        const uint8_t* __restrict__ row = m + y * W;
        uint8_t* __restrict__ acc = colany.data();
        uint64_t any = 0;
        for (int64_t i = 0; i < W8; ++i) {
          uint64_t v, a;
          std::memcpy(&v, row + 8 * i, 8);
          std::memcpy(&a, acc + 8 * i, 8);
          a |= v;
          any |= v;
          std::memcpy(acc + 8 * i, &a, 8);
        }
        for (int64_t x = 8 * W8; x < W; ++x) {
          acc[x] |= row[x];
          any |= row[x];
        }
        if (any) {
          ry0 = std::min(ry0, y);
          ry1 = y;
        }
      }
      cpu::RunLengths runs(counts);
      if (ry1 < 0) {
        runs.add(0, static_cast<uint64_t>(H * W));
      } else {
        int64_t rx0 = 0, rx1 = W - 1;
        while (!colany[rx0]) ++rx0;
        while (!colany[rx1]) --rx1;
        const int64_t ch = ry1 - ry0 + 1;
        runs.add(0, static_cast<uint64_t>(rx0 * H));
        for (int64_t x = rx0; x <= rx1; ++x) {
          for (int64_t y = 0; y < ch; ++y) col[y] = m[(ry0 + y) * W + x] != 0;
          runs.add(0, static_cast<uint64_t>(ry0));
          runs.column(col.data(), ch);
          runs.add(0, static_cast<uint64_t>(H - 1 - ry1));
        }
        runs.add(0, static_cast<uint64_t>((W - 1 - rx1) * H));
      }
      runs.finish();
      out[n] = rle_counts_string(counts);
    }
  });
  return out;
}

}  // namespace mrcnn
