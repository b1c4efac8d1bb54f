// Fused batch norm + ReLU + max pool on the CPU: forward, the two backward passes and the channel moments.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/parallel.h"
#include "mrcnn/common/simd.h"
#include "mrcnn/ops/bn_relu_max_pool.h"
#include "mrcnn/ops/detail/map_layout.h"
#include "mrcnn/ops/detail/max_pool_math.h"

namespace mrcnn {
namespace {

namespace mp = detail::maxpool;

// The per-row loops run over contiguous channel vectors in the channels-last layout and are compiled for
// AVX2 as well (MRCNN_SIMD_CLONES; the baseline x86-64 target has only SSE2). NCHW runs the same code with
// strided channels, without the clones.

// Reductions split the rows into at most kMaxChunks chunks whose size depends only on the shape; each
// chunk sums its rows in order into its own partial, and the partials are added in chunk order: the
// result is the same for every thread count.
constexpr int64_t kMaxChunks = 256;

struct Chunks {
  int64_t rows, per, count;
};
Chunks chunks_for(int64_t rows) {
  Chunks c;
  c.rows = rows;
  c.per = std::max<int64_t>(1, (rows + kMaxChunks - 1) / kMaxChunks);
  c.count = (rows + c.per - 1) / c.per;
  return c;
}

template <class T>
struct Args {
  const T *x, *grad, *scale, *shift, *a, *b, *d;
  const int32_t* arg;
  T *y, *gx;
  int32_t* arg_out;
  int64_t N, C, H, W, OH, OW;
  PoolGeometry g;
  bool use_x;
};

// Sums of x - shift[c] (shift = x[0, c, 0, 0]) keep the one-pass variance accurate when |mean| >> std.
template <class T, bool CL>
MRCNN_ALWAYS_INLINE void moments_rows(const Args<T>& p, const double* __restrict__ shift, int64_t r0, int64_t r1,
                                      double* __restrict__ sum, double* __restrict__ sq) {
  const detail::MapStrides sx = detail::map_strides(p.C, p.H, p.W, CL);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = p.x + (r / p.H) * sx.batch + (r % p.H) * p.W * sx.cell;
    for (int64_t w = 0; w < p.W; ++w) {
      const T* __restrict__ px = row + w * sx.cell;
      for (int64_t c = 0; c < p.C; ++c) {
        const double v = static_cast<double>(px[c * sx.channel]) - shift[c];
        sum[c] += v;
        sq[c] += v * v;
      }
    }
  }
}

template <class T, bool CL>
MRCNN_ALWAYS_INLINE void forward_rows(const Args<T>& p, int64_t r0, int64_t r1, T* __restrict__ m,
                                      int32_t* __restrict__ a) {
  const detail::MapStrides sx = detail::map_strides(p.C, p.H, p.W, CL), so = detail::map_strides(p.C, p.OH, p.OW, CL);
  const int64_t C = p.C, W = p.W;
  const T* __restrict__ scale = p.scale;
  const T* __restrict__ shift = p.shift;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.OH, oh = r % p.OH;
    int64_t h0, h1;
    mp::window(oh, p.g.kernel_h, p.g.stride_h, p.g.pad_h, p.H, h0, h1);
    const T* xb = p.x + n * sx.batch;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      int64_t w0, w1;
      mp::window(ow, p.g.kernel_w, p.g.stride_w, p.g.pad_w, W, w0, w1);
      const int32_t first = static_cast<int32_t>(h0 * W + w0);
      for (int64_t c = 0; c < C; ++c) {
        m[c] = -std::numeric_limits<T>::infinity();
        a[c] = first;
      }
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const int32_t idx = static_cast<int32_t>(h * W + w);
          const T* __restrict__ px = xb + idx * sx.cell;
          for (int64_t c = 0; c < C; ++c) {
            const T v = px[c * sx.channel] * scale[c] + shift[c];
            const bool take = mp::takes(v, m[c]);
            m[c] = take ? v : m[c];
            a[c] = take ? idx : a[c];
          }
        }
      }
      T* __restrict__ o = p.y + n * so.batch + (oh * p.OW + ow) * so.cell;
      int32_t* __restrict__ ao = p.arg_out + n * so.batch + (oh * p.OW + ow) * so.cell;
      for (int64_t c = 0; c < C; ++c) {
        o[c * so.channel] = mp::relu(m[c]);
        ao[c * so.channel] = m[c] <= T(0) ? -1 : a[c];
      }
    }
  }
}

template <class T, bool CL>
MRCNN_ALWAYS_INLINE void reduce_rows(const Args<T>& p, int64_t r0, int64_t r1, double* __restrict__ sg,
                                     double* __restrict__ sgx) {
  const detail::MapStrides sx = detail::map_strides(p.C, p.H, p.W, CL), so = detail::map_strides(p.C, p.OH, p.OW, CL);
  const uint64_t HW = static_cast<uint64_t>(p.H * p.W);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.OH, oh = r % p.OH;
    const T* xb = p.x + n * sx.batch;
    for (int64_t ow = 0; ow < p.OW; ++ow) {
      const int64_t o = n * so.batch + (oh * p.OW + ow) * so.cell;
      for (int64_t c = 0; c < p.C; ++c) {
        const int64_t i = o + c * so.channel;
        const int64_t am = p.arg[i];
        // The unsigned compare rejects -1 (ReLU cut the window) and any corrupt arg-max.
        if (static_cast<uint64_t>(am) >= HW) continue;
        const double gv = static_cast<double>(p.grad[i]);
        sg[c] += gv;
        sgx[c] += gv * static_cast<double>(xb[am * sx.cell + c * sx.channel]);
      }
    }
  }
}

template <class T, bool CL>
MRCNN_ALWAYS_INLINE void input_rows(const Args<T>& p, int64_t r0, int64_t r1, T* __restrict__ G) {
  const detail::MapStrides sx = detail::map_strides(p.C, p.H, p.W, CL), so = detail::map_strides(p.C, p.OH, p.OW, CL);
  const int64_t C = p.C, W = p.W;
  const T* __restrict__ grad = p.grad;
  const int32_t* __restrict__ arg = p.arg;
  const T* __restrict__ ca = p.a;
  const T* __restrict__ cb = p.b;
  const T* __restrict__ cd = p.d;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.H, h = r % p.H;
    int64_t oh0, oh1;
    mp::covering(h, p.g.kernel_h, p.g.stride_h, p.g.pad_h, p.OH, oh0, oh1);
    for (int64_t w = 0; w < W; ++w) {
      int64_t ow0, ow1;
      mp::covering(w, p.g.kernel_w, p.g.stride_w, p.g.pad_w, p.OW, ow0, ow1);
      const int32_t idx = static_cast<int32_t>(h * W + w);
      for (int64_t c = 0; c < C; ++c) G[c] = T(0);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        for (int64_t ow = ow0; ow < ow1; ++ow) {
          const int64_t o = n * so.batch + (oh * p.OW + ow) * so.cell;
          for (int64_t c = 0; c < C; ++c) {
            // Both loads unconditional so the select vectorises (a conditional load is a branch).
            const T gv = grad[o + c * so.channel];
            G[c] += arg[o + c * so.channel] == idx ? gv : T(0);
          }
        }
      }
      const int64_t e = n * sx.batch + idx * sx.cell;
      T* __restrict__ gx = p.gx + e;
      const T* __restrict__ xe = p.x + e;
      if (p.use_x) {
        for (int64_t c = 0; c < C; ++c) gx[c * sx.channel] = ca[c] * G[c] + cb[c] * xe[c * sx.channel] + cd[c];
      } else {
        for (int64_t c = 0; c < C; ++c) gx[c * sx.channel] = ca[c] * G[c] + cd[c];
      }
    }
  }
}

// Channels-last entry points of the row loops, cloned for AVX2 except the forward: its AVX2 clone measured
// slower than the SSE2 build (5.7 vs 4.2 ms for 4x64x128x128 on one Zen 5 thread, the select chain of the
// running max and arg-max does not gain from the wider vectors).
#define MRCNN_CL_CLONES(T)                                                                                      \
  MRCNN_SIMD_CLONES void moments_rows_cl(const Args<T>& p, const double* shift, int64_t r0, int64_t r1,        \
                                         double* sum, double* sq) {                                            \
    moments_rows<T, true>(p, shift, r0, r1, sum, sq);                                                          \
  }                                                                                                            \
  void forward_rows_cl(const Args<T>& p, int64_t r0, int64_t r1, T* m, int32_t* a) {                          \
    forward_rows<T, true>(p, r0, r1, m, a);                                                                    \
  }                                                                                                            \
  MRCNN_SIMD_CLONES void reduce_rows_cl(const Args<T>& p, int64_t r0, int64_t r1, double* sg, double* sgx) {  \
    reduce_rows<T, true>(p, r0, r1, sg, sgx);                                                                  \
  }                                                                                                            \
  MRCNN_SIMD_CLONES void input_rows_cl(const Args<T>& p, int64_t r0, int64_t r1, T* G) {                      \
    input_rows<T, true>(p, r0, r1, G);                                                                         \
  }
MRCNN_CL_CLONES(float)
MRCNN_CL_CLONES(double)
#undef MRCNN_CL_CLONES

// Two per-channel sums (out_a, out_b: [C]) over `rows` rows: rows_fn(r0, r1, a, b) adds rows [r0, r1) into one
// chunk's partials a[C], b[C], and the partials are added in chunk order.
template <class RowsFn>
void chunked_sums(int64_t rows, int64_t C, RowsFn rows_fn, double* out_a, double* out_b) {
  const Chunks ch = chunks_for(rows);
  std::vector<double> part(static_cast<size_t>(ch.count * 2 * C), 0.0);
  parallel_for(0, ch.count, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* a = part.data() + k * 2 * C;
      rows_fn(k * ch.per, std::min(ch.rows, (k + 1) * ch.per), a, a + C);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t k = 0; k < ch.count; ++k) {
      a += part[k * 2 * C + c];
      b += part[k * 2 * C + C + c];
    }
    out_a[c] = a;
    out_b[c] = b;
  }
}

template <class T, bool CL>
void run_moments(const Args<T>& p, double* mean, double* var) {
  const int64_t C = p.C;
  const int64_t cs = CL ? 1 : p.H * p.W;
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(p.x[c * cs]);
  std::vector<double> sum(static_cast<size_t>(C)), sq(static_cast<size_t>(C));
  chunked_sums(
      p.N * p.H, C,
      [&](int64_t r0, int64_t r1, double* a, double* b) {
        if (CL)
          moments_rows_cl(p, shift.data(), r0, r1, a, b);
        else
          moments_rows<T, false>(p, shift.data(), r0, r1, a, b);
      },
      sum.data(), sq.data());
  const double M = static_cast<double>(p.N * p.H * p.W);
  for (int64_t c = 0; c < C; ++c) {
    const double m = sum[c] / M;
    mean[c] = shift[c] + m;
    var[c] = std::max(0.0, sq[c] / M - m * m);
  }
}

template <class T, bool CL>
void run_forward(const Args<T>& p) {
  parallel_for(0, p.N * p.OH, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.OW * p.C)),
               [&](int64_t r0, int64_t r1) {
                 std::vector<T> m(static_cast<size_t>(p.C));
                 std::vector<int32_t> a(static_cast<size_t>(p.C));
                 if (CL)
                   forward_rows_cl(p, r0, r1, m.data(), a.data());
                 else
                   forward_rows<T, false>(p, r0, r1, m.data(), a.data());
               });
}

template <class T, bool CL>
void run_reduce(const Args<T>& p, double* sum_g, double* sum_gx) {
  chunked_sums(
      p.N * p.OH, p.C,
      [&](int64_t r0, int64_t r1, double* sg, double* sgx) {
        if (CL)
          reduce_rows_cl(p, r0, r1, sg, sgx);
        else
          reduce_rows<T, false>(p, r0, r1, sg, sgx);
      },
      sum_g, sum_gx);
}

template <class T, bool CL>
void run_input(const Args<T>& p) {
  parallel_for(0, p.N * p.H, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.W * p.C)),
               [&](int64_t r0, int64_t r1) {
                 std::vector<T> G(static_cast<size_t>(p.C));
                 if (CL)
                   input_rows_cl(p, r0, r1, G.data());
                 else
                   input_rows<T, false>(p, r0, r1, G.data());
               });
}

// x enters the input gradient only through b (batch statistics); with b == 0 it is not read at all, so a
// NaN or inf input keeps the finite gradient torch gives it (its batch-norm backward never reads x then).
template <class T>
bool uses_x(const T* b, int64_t C) {
  for (int64_t c = 0; c < C; ++c)
    if (b[c] != T(0)) return true;
  return false;
}

// x's pointer and sizes; OH, OW from a pooled-shape tensor (out or argmax) when given.
template <class T>
Args<T> make_args(const TensorView& x, const TensorView* pooled) {
  Args<T> p{};
  p.x = x.ptr<T>();
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.OH = pooled ? pooled->size(2) : 0;
  p.OW = pooled ? pooled->size(3) : 0;
  return p;
}

}  // namespace

void channel_moments_cpu(const TensorView& x, const TensorView& mean, const TensorView& var) {
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CPU_FLOAT(x.dtype, "channel_moments", [&] {
    const Args<scalar_t> p = make_args<scalar_t>(x, nullptr);
    if (cl)
      run_moments<scalar_t, true>(p, mean.ptr<double>(), var.ptr<double>());
    else
      run_moments<scalar_t, false>(p, mean.ptr<double>(), var.ptr<double>());
  });
}

void bn_relu_max_pool_forward_cpu(const TensorView& x, const TensorView& scale, const TensorView& shift,
                                  const PoolGeometry& g, const TensorView& out, const TensorView& argmax) {
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CPU_FLOAT(x.dtype, "bn_relu_max_pool", [&] {
    Args<scalar_t> p = make_args<scalar_t>(x, &out);
    p.scale = scale.ptr<scalar_t>();
    p.shift = shift.ptr<scalar_t>();
    p.y = out.ptr<scalar_t>();
    p.arg_out = argmax.ptr<int32_t>();
    p.g = g;
    if (cl)
      run_forward<scalar_t, true>(p);
    else
      run_forward<scalar_t, false>(p);
  });
}

void bn_relu_max_pool_backward_reduce_cpu(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                          const TensorView& sum_g, const TensorView& sum_gx) {
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CPU_FLOAT(x.dtype, "bn_relu_max_pool_backward", [&] {
    Args<scalar_t> p = make_args<scalar_t>(x, &argmax);
    p.grad = grad_out.ptr<scalar_t>();
    p.arg = argmax.ptr<int32_t>();
    if (cl)
      run_reduce<scalar_t, true>(p, sum_g.ptr<double>(), sum_gx.ptr<double>());
    else
      run_reduce<scalar_t, false>(p, sum_g.ptr<double>(), sum_gx.ptr<double>());
  });
}

void bn_relu_max_pool_backward_input_cpu(const TensorView& grad_out, const TensorView& argmax, const TensorView& x,
                                         const TensorView& a, const TensorView& b, const TensorView& d,
                                         const PoolGeometry& g, const TensorView& grad_x) {
  const bool cl = !x.is_contiguous();
  MRCNN_DISPATCH_CPU_FLOAT(x.dtype, "bn_relu_max_pool_backward", [&] {
    Args<scalar_t> p = make_args<scalar_t>(x, &argmax);
    p.grad = grad_out.ptr<scalar_t>();
    p.arg = argmax.ptr<int32_t>();
    p.a = a.ptr<scalar_t>();
    p.b = b.ptr<scalar_t>();
    p.d = d.ptr<scalar_t>();
    p.gx = grad_x.ptr<scalar_t>();
    p.g = g;
    p.use_x = uses_x(p.b, p.C);
    if (cl)
      run_input<scalar_t, true>(p);
    else
      run_input<scalar_t, false>(p);
  });
}

}  // namespace mrcnn
