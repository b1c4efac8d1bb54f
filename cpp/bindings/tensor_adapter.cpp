#include "tensor_adapter.h"

#include <string>
#include <vector>

#include "mrcnn/common/check.h"

namespace mrcnn {
namespace bind {

namespace {

DType to_dtype(const dl::DataType& t, const char* name) {
  MRCNN_CHECK_TYPE(t.lanes == 1, name, ": vector dtypes (lanes != 1) are not supported");
  switch (t.code) {
    case dl::kFloat:
      if (t.bits == 16) return DType::Float16;
      if (t.bits == 32) return DType::Float32;
      if (t.bits == 64) return DType::Float64;
      break;
    case dl::kBfloat:
      if (t.bits == 16) return DType::BFloat16;
      break;
    case dl::kInt:
      if (t.bits == 32) return DType::Int32;
      if (t.bits == 64) return DType::Int64;
      break;
    case dl::kUInt:
      if (t.bits == 8) return DType::UInt8;
      break;
    case dl::kBool:
      if (t.bits == 8) return DType::Bool;
      break;
  }
  throw TypeError(detail::str(name, ": unsupported dtype (DLPack code ", int(t.code), ", bits ", int(t.bits), ")"));
}

}  // namespace

Borrowed::Borrowed(py::handle capsule, const char* name) {
  PyObject* obj = capsule.ptr();
  if (!PyCapsule_CheckExact(obj) || !PyCapsule_IsValid(obj, "dltensor"))
    throw TypeError(detail::str(name, ": expected an unused DLPack capsule"));
  managed_ = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"));
  // Taking ownership: the producer's capsule destructor must no longer free it; we call the deleter.
  PyCapsule_SetName(obj, "used_dltensor");
  const dl::Tensor& t = managed_->dl_tensor;
  if (t.ndim > kMaxDims) throw ValueError(detail::str(name, ": at most ", kMaxDims, " dimensions supported"));
  view_.ndim = t.ndim;
  view_.dtype = to_dtype(t.dtype, name);
  switch (t.device.device_type) {
    case dl::kCPU: case dl::kCUDAHost: view_.device = DeviceType::CPU; break;
    case dl::kCUDA: case dl::kCUDAManaged: view_.device = DeviceType::CUDA; break;
    default: throw ValueError(detail::str(name, ": unsupported device type ", t.device.device_type));
  }
  view_.device_id = t.device.device_id;
  view_.data = static_cast<char*>(t.data) + t.byte_offset;
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    view_.sizes[i] = t.shape[i];
    view_.strides[i] = t.strides ? t.strides[i] : expect;
    expect *= t.shape[i];
  }
}

Borrowed::~Borrowed() {
  if (managed_ && managed_->deleter) managed_->deleter(managed_);
}

py::list to_bytes_list(const std::vector<std::string>& strs) {
  py::list out(strs.size());
  for (size_t i = 0; i < strs.size(); ++i) out[i] = py::bytes(strs[i]);
  return out;
}

namespace {
std::vector<BindFn>& registry() {
  static std::vector<BindFn> fns;
  return fns;
}
}  // namespace

int register_bindings(BindFn fn) {
  registry().push_back(fn);
  return static_cast<int>(registry().size());
}

void run_registered(py::module_& m) {
  for (BindFn fn : registry()) fn(m);
}

}  // namespace bind
}  // namespace mrcnn
