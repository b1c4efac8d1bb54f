#pragma once
// Zero-copy views of caller tensors: a DLPack capsule (from torch, numpy, cupy, ...) becomes a
// mrcnn::TensorView for the duration of one call, then the producer's deleter is called.
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "dlpack_abi.h"
#include "mrcnn/common/tensor.h"

namespace mrcnn {
namespace bind {

namespace py = pybind11;

class Borrowed {
 public:
  Borrowed(py::handle capsule, const char* name);
  ~Borrowed();
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }

 private:
  dl::ManagedTensor* managed_ = nullptr;
  TensorView view_;
};

inline Stream as_stream(uintptr_t s) { return reinterpret_cast<Stream>(s); }

// Byte strings (e.g. RLE counts) as a list of Python bytes.
py::list to_bytes_list(const std::vector<std::string>& strs);

// Registration of binding files: each file registers a function that adds its defs to the module,
// so ops can be added without touching a central list.
using BindFn = void (*)(py::module_&);
int register_bindings(BindFn fn);
void run_registered(py::module_& m);

}  // namespace bind
}  // namespace mrcnn

#define MRCNN_BIND_CAT2(a, b) a##b
#define MRCNN_BIND_CAT(a, b) MRCNN_BIND_CAT2(a, b)
#define MRCNN_REGISTER_BINDINGS(fn) \
  static const int MRCNN_BIND_CAT(mrcnn_bind_reg_, __LINE__) = ::mrcnn::bind::register_bindings(fn)
