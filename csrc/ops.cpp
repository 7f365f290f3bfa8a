// The commcomp operator library: every schema is declared here, once. Backends add kernels
// with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; shapes for torch.compile are
// registered from Python (commcomp/ops/_meta.py). commcomp/ops/_schemas.py holds the same
// strings for the pure-PyTorch fallback, and a test keeps the two in step.
#include <Python.h>
#include <torch/library.h>

#ifndef COMMCOMP_TORCH_MAJOR
#define COMMCOMP_TORCH_MAJOR 0
#define COMMCOMP_TORCH_MINOR 0
#endif

extern "C" {
// A minimal Python module so that `import commcomp._C` loads this library and runs the
// registrations below. It records the torch it was built against, to catch ABI mismatches.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr) {
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
  m.def("countsketch(Tensor x, int sketch_size, int seed) -> Tensor");
  m.def("countsketch_transpose(Tensor y, int numel, int seed) -> Tensor");
  m.def("srht(Tensor x, int sketch_size, int block, int seed) -> Tensor");
  m.def("srht_transpose(Tensor y, int numel, int block, int seed) -> Tensor");
}
