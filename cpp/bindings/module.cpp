// The pybind11 module mrcnn_fast._C: thin wrappers over the torch-free core. Every op file registers
// its own defs (bind_*.cpp); this file only sets up errors and module-wide helpers.
#include <pybind11/pybind11.h>

#include "mrcnn/common/check.h"
#include "mrcnn/common/cuda_entry.h"
#include "mrcnn/common/parallel.h"
#include "tensor_adapter.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mrcnn_fast C++/CUDA core";
  static py::exception<mrcnn::ValueError> value_error(m, "_CoreValueError", PyExc_ValueError);
  static py::exception<mrcnn::TypeError> type_error(m, "_CoreTypeError", PyExc_TypeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mrcnn::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const mrcnn::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("cuda_compiled", &mrcnn::cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("cuda_device_count", &mrcnn::cuda_device_count);
  m.def("get_num_threads", &mrcnn::get_num_threads);
  m.def("set_num_threads", &mrcnn::set_num_threads, py::arg("n"));
  mrcnn::bind::run_registered(m);
}
