#pragma once
// Shared CUDA plumbing: error checks, device guard, launch sizing, and float32 access to half types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mrcnn/common/check.h"
#include "mrcnn/common/dispatch.h"
#include "mrcnn/common/tensor.h"

#define MRCNN_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    cudaError_t err__ = (expr);                                                             \
    if (err__ != cudaSuccess) MRCNN_FAIL("CUDA error ", cudaGetErrorString(err__), " at ", \
                                         __FILE__, ":", __LINE__);                         \
  } while (0)
#define MRCNN_CUDA_CHECK_LAUNCH() MRCNN_CUDA_CHECK(cudaGetLastError())

namespace mrcnn {
namespace cuda {

// Selects the tensor's device for the scope and restores the caller's afterwards.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    MRCNN_CUDA_CHECK(cudaGetDevice(&prev));
    if (prev != device) MRCNN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

inline cudaStream_t as_stream(Stream s) { return reinterpret_cast<cudaStream_t>(s); }

// Grid-stride loop: each thread takes i = its global index, then every (grid size)-th one below n.
#define MRCNN_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535LL * 16) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, cap)));
}

// Accumulation type: float for half types and float, double for double.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <class T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

}  // namespace cuda
}  // namespace mrcnn

// The CUDA floating types: half, bfloat16, float, double (dispatch.h).
#define MRCNN_DISPATCH_CUDA_FLOAT(dtype, name, ...)             \
  [&] {                                                         \
    switch (dtype) {                                            \
      MRCNN_DISPATCH_CASE(Float16, __half, __VA_ARGS__)         \
      MRCNN_DISPATCH_CASE(BFloat16, __nv_bfloat16, __VA_ARGS__) \
      MRCNN_DISPATCH_CASE(Float32, float, __VA_ARGS__)          \
      MRCNN_DISPATCH_CASE(Float64, double, __VA_ARGS__)         \
      MRCNN_DISPATCH_UNSUPPORTED(dtype, name, "CUDA");          \
    }                                                           \
  }()

// For kernels that take float32 and float64 only.
#define MRCNN_DISPATCH_CUDA_F32_F64(dtype, name, ...)    \
  [&] {                                                  \
    switch (dtype) {                                     \
      MRCNN_DISPATCH_CASE(Float32, float, __VA_ARGS__)   \
      MRCNN_DISPATCH_CASE(Float64, double, __VA_ARGS__)  \
      MRCNN_DISPATCH_UNSUPPORTED(dtype, name, "CUDA");   \
    }                                                    \
  }()
