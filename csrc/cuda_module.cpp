// The Python module belay_kernels._C_cuda: importing it registers the CUDA
// implementations (cuda_kernels.cu) of the ops that belay_kernels._C defines.
#include <Python.h>

static PyModuleDef cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                  "CUDA kernels of belay_kernels (registered on import).", -1,
                                  nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cuda_module); }
