// The Python module belay_kernels._C_cuda: importing it registers the CUDA
// implementations (cuda_kernels.cu) of the ops that belay_kernels._C defines. It also
// says which archs the kernels were built for, and whether a device can load them.
#include <Python.h>

#include <exception>

namespace belay {
const char* built_arches();
const char* kernel_image_error(int device);
}  // namespace belay

static PyObject* built_arches(PyObject*, PyObject*) {
  return PyUnicode_FromString(belay::built_arches());
}

static PyObject* kernel_image_error(PyObject*, PyObject* device) {
  const long index = PyLong_AsLong(device);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  const char* error = nullptr;
  try {
    error = belay::kernel_image_error(static_cast<int>(index));
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_RuntimeError, exc.what());
    return nullptr;
  }
  return PyUnicode_FromString(error);
}

static PyMethodDef cuda_methods[] = {
    {"built_arches", built_arches, METH_NOARGS,
     "The virtual archs the kernels were compiled for, e.g. '750,800,900'."},
    {"kernel_image_error", kernel_image_error, METH_O,
     "'' when the device of this index can load the kernels, else the CUDA error."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                  "CUDA kernels of belay_kernels (registered on import).", -1,
                                  cuda_methods};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cuda_module); }
