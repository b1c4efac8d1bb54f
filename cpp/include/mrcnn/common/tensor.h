#pragma once
// A non-owning view of a strided tensor. The core never allocates or frees caller memory: bindings (or
// an embedding application) build these views over memory they own.
#include <cstdint>
#include <string>

namespace mrcnn {

enum class DType : int8_t { Float16, BFloat16, Float32, Float64, Int32, Int64, UInt8, Bool };
enum class DeviceType : int8_t { CPU, CUDA };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float64: case DType::Int64: return 8;
    case DType::UInt8: case DType::Bool: return 1;
  }
  return 0;
}

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  DeviceType device = DeviceType::CPU;
  int device_id = 0;
  int ndim = 0;
  int64_t sizes[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // in elements

  template <class T> T* ptr() const { return static_cast<T*>(data); }
  int64_t size(int d) const { return sizes[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
  bool is_cuda() const { return device == DeviceType::CUDA; }
  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (sizes[i] != 1 && strides[i] != expect) return false;
      expect *= sizes[i];
    }
    return true;
  }
  // NCHW tensor stored as NHWC (torch.channels_last).
  bool is_channels_last() const {
    if (ndim != 4) return false;
    if (numel() == 0) return true;
    const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
    return (C == 1 || strides[1] == 1) && (W == 1 || strides[3] == C) && (H == 1 || strides[2] == W * C) &&
           (sizes[0] == 1 || strides[0] == H * W * C);
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
    return s + "]";
  }
};

// Opaque CUDA stream handle (cudaStream_t) so headers stay free of CUDA includes.
using Stream = void*;

}  // namespace mrcnn
