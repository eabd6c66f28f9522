// The Python module belay_kernels._C: importing it registers the ops (registration.cpp,
// cpu_kernels*.cpp). Its Python names: BoundTensors (bound_tensors.cpp), the check a step
// makes that the model still holds the planned tensors; the CPU loop's clones (cpu_isa.h);
// and the tests' simulated grid.
// Only pybind11: torch/extension.h would pull in the whole of torch's headers, which made
// this small file as slow to compile as the kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "cpu_isa.h"
#include "profiles.h"

namespace belay {
void set_simulated_grid(int64_t blocks, int64_t threads, int64_t chunk);
void register_bound_tensors(pybind11::module_& m);
}

namespace {

void set_cpu_isa_or_raise(const std::string& name) {
  const std::string error = belay::set_cpu_isa(name);
  if (!error.empty()) throw pybind11::value_error(error);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_simulate_cuda_grid", &belay::set_simulated_grid, pybind11::arg("blocks"),
        pybind11::arg("threads"), pybind11::arg("chunk"),
        "Set the simulated grid of `blocks` x `threads` (tensor lists in chunks of `chunk` "
        "elements) that the belay_kernels_grid ops run the CUDA kernels' bodies on.");
  m.def("cpu_isa", &belay::cpu_isa_name,
        "The clone of the CPU loops that the CPU kernels run: avx512, avx2 or baseline.");
  m.def("supported_cpu_isas", &belay::supported_cpu_isas,
        "The clones of the CPU loops that this CPU runs, narrowest first.");
  m.def("_set_cpu_isa", &set_cpu_isa_or_raise, pybind11::arg("name"),
        "Run the CPU loops' clone `name` (one of supported_cpu_isas()), or the widest for "
        "''; ValueError for any other name. The tests compare the clones with it.");
  m.attr("MAX_PROFILES") = belay::kMaxProfiles;
  belay::register_bound_tensors(m);
  // The user's choice of clone, checked here so that a wrong one fails the import with its
  // reason (belay-kernels backends shows it) rather than every kernel call.
  if (const char* forced = std::getenv("BELAY_KERNELS_CPU_ISA")) set_cpu_isa_or_raise(forced);
}
