// The commcomp operator library: every schema is declared here, once. Backends add kernels
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; shapes for torch.compile are
// registered from Python (commcomp/ops/_meta.py). commcomp/ops/_schemas.py holds the same
// strings for the pure-PyTorch fallback, and a test keeps the two in step.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "ternary.h"

#ifndef COMMCOMP_TORCH_MAJOR
#define COMMCOMP_TORCH_MAJOR 0
#define COMMCOMP_TORCH_MINOR 0
#endif

namespace commcomp {
// csrc/cpu/ternary.cpp: the instruction set of the ternary CPU kernels.
const char* ternary_isa();
bool set_ternary_isa(const char* name);
std::string ternary_isas();
}  // namespace commcomp

namespace {
// _ternary_isa() -> the instruction set the ternary CPU kernels use ("sse2", "avx2" or
// "avx512"); _ternary_isa(name) switches to it and returns the previous one (ValueError if
// this CPU lacks it). For tests and benchmarks: every path gives the same bytes.
PyObject* py_ternary_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "|z", &name)) return nullptr;
  std::string previous;
  try {
    previous = commcomp::ternary_isa();  // the first call reads COMMCOMP_TERNARY_ISA
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  if (name != nullptr && !commcomp::set_ternary_isa(name)) {
    PyErr_Format(PyExc_ValueError,
                 "commcomp: %s is not an instruction set of the ternary kernels this CPU runs (%s)",
                 name, commcomp::ternary_isas().c_str());
    return nullptr;
  }
  return PyUnicode_FromString(previous.c_str());
}

// _ternary_isas() -> the instruction sets this CPU runs, baseline first.
PyObject* py_ternary_isas(PyObject*, PyObject*) {
  const std::string list = commcomp::ternary_isas();
  PyObject* text = PyUnicode_FromString(list.c_str());
  if (text == nullptr) return nullptr;
  PyObject* sep = PyUnicode_FromString(", ");
  PyObject* parts = sep == nullptr ? nullptr : PyUnicode_Split(text, sep, -1);
  Py_XDECREF(sep);
  Py_DECREF(text);
  if (parts == nullptr) return nullptr;
  PyObject* out = PyList_AsTuple(parts);
  Py_DECREF(parts);
  return out;
}

PyMethodDef kMethods[] = {
    {"_ternary_isa", py_ternary_isa, METH_VARARGS,
     "get or set the ternary kernels' instruction set"},
    {"_ternary_isas", py_ternary_isas, METH_NOARGS, "instruction sets this CPU runs"},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// A minimal Python module so that `import commcomp._C` loads this library and runs the
// registrations below. It records the torch it was built against, to catch ABI mismatches,
// and the ternary codec's spec version (csrc/ternary.h), which the loader checks.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr) {
    PyModule_AddIntConstant(m, "ternary_spec_version", commcomp::kTernarySpecVersion);
    // major.minor of the torch whose headers this was compiled with (setup.py passes them)
    PyObject* v = PyUnicode_FromFormat("%d.%d", COMMCOMP_TORCH_MAJOR, COMMCOMP_TORCH_MINOR);
    if (v != nullptr) PyModule_AddObject(m, "torch_version", v);
#ifdef COMMCOMP_WITH_CUDA
    PyModule_AddIntConstant(m, "with_cuda", 1);
#else
    PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  }
  return m;
}
}

TORCH_LIBRARY(commcomp, m) {
  m.def("ternarize_pack(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor");
  m.def("ternarize_int8(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor");
  m.def("unpack(Tensor packed, int numel, Tensor scales, int[]? segments, ScalarType dtype) -> Tensor");
  m.def("unpack_accumulate(Tensor packed, Tensor scales, int[]? segments, Tensor(a!) out) -> ()");
  m.def("segment_stats(Tensor x, int[]? segments) -> (Tensor, Tensor)");
  m.def("ternarize_base3(Tensor x, Tensor scales, int[]? segments, int seed, int offset) -> Tensor");
  m.def("unpack_base3(Tensor packed, int numel, Tensor scales, int[]? segments, ScalarType dtype) -> Tensor");
  m.def("mix_stats(Tensor v, Tensor hat, int[]? segments) -> Tensor");
  m.def("mix_encode(Tensor(a!) v, Tensor(b!) hat, Tensor(c!) acc, Tensor scales, Tensor hat_scales, "
        "Tensor acc_scales, int[]? segments, int seed, int offset, bool base3) -> Tensor");
  m.def("mix_decode(Tensor(a!) v, Tensor hat, Tensor(b!) acc, Tensor[] packed, Tensor scales, "
        "int[]? segments, float gamma, bool base3) -> ()");
  m.def("track_prep(Tensor(a!) y, Tensor g, Tensor(b!) g_prev) -> Tensor");
  m.def("countsketch(Tensor x, int sketch_size, int seed) -> Tensor");
  m.def("countsketch_transpose(Tensor y, int numel, int seed) -> Tensor");
  m.def("srht(Tensor x, int sketch_size, int block, int seed) -> Tensor");
  m.def("srht_transpose(Tensor y, int numel, int block, int seed) -> Tensor");
}
