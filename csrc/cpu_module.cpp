// The Python module belay_kernels._C: importing it registers the ops (registration.cpp,
// cpu_kernels.cpp). Its one Python function is the tests' simulated-grid switch.
// Only pybind11: torch/extension.h would pull in the whole of torch's headers, which made
// this small file as slow to compile as the kernels.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "profiles.h"

namespace belay {
void set_simulated_grid(int64_t blocks, int64_t threads, int64_t chunk);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_simulate_cuda_grid", &belay::set_simulated_grid, pybind11::arg("blocks"),
        pybind11::arg("threads"), pybind11::arg("chunk"),
        "Run the CPU ops on the CUDA kernels' bodies over a simulated grid of `blocks` x "
        "`threads` (tensor lists in chunks of `chunk` elements); blocks=0 switches back.");
  m.attr("MAX_PROFILES") = belay::kMaxProfiles;
}
