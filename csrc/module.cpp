// The Python module `hybrid_detr.layers._C` (also reachable as `hybrid_detr._C`). Importing it loads
// this library, whose static initialisers register the hybrid_detr ops with the dispatcher (see
// ms_deform_attn.cpp). Plain CPython API, no pybind11: the ops are reached through torch.ops.hybrid_detr.
#include <Python.h>

#include "ms_deform_attn.h"

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(hybrid_detr::cpu_kernel_isa());
}

PyObject* cpu_kernel_variants(PyObject*, PyObject*) {
  return PyUnicode_FromString(hybrid_detr::cpu_kernel_variants());
}

PyObject* cpu_parallel_threads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(hybrid_detr::cpu_parallel_threads());
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The CPU kernel variant in use: 'baseline', 'avx2' or 'avx512' (follows ATEN_CPU_CAPABILITY)."},
    {"cpu_kernel_variants", cpu_kernel_variants, METH_NOARGS,
     "The CPU kernel variants compiled in, comma-separated, e.g. 'baseline,avx2,avx512'."},
    {"cpu_parallel_threads", cpu_parallel_threads, METH_NOARGS,
     "How many threads the CPU kernels' parallel loops run on now (1 in a build without OpenMP)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled ops of HybridDETR (torch.ops.hybrid_detr.*).",
    -1,
    methods,
};

} // namespace

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&module_def);
}
