// The Python module belay_kernels._C: importing it registers the ops (registration.cpp,
// cpu_kernels*.cpp). Its Python names: BoundTensors (bound_tensors.cpp), the check a step
// makes that the model still holds the planned tensors, and the tests' simulated grid.
// Only pybind11: torch/extension.h would pull in the whole of torch's headers, which made
// this small file as slow to compile as the kernels.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "profiles.h"

namespace belay {
void set_simulated_grid(int64_t blocks, int64_t threads, int64_t chunk);
void register_bound_tensors(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_simulate_cuda_grid", &belay::set_simulated_grid, pybind11::arg("blocks"),
        pybind11::arg("threads"), pybind11::arg("chunk"),
        "Set the simulated grid of `blocks` x `threads` (tensor lists in chunks of `chunk` "
        "elements) that the belay_kernels_grid ops run the CUDA kernels' bodies on.");
  m.attr("MAX_PROFILES") = belay::kMaxProfiles;
  belay::register_bound_tensors(m);
}
