// The CPU op BELAY (the loops: cpu_loops.h).
#include "cpu_loops.h"

namespace {

// As in cpu_kernels.cpp: the CPU kernels and their simulated-grid twins.
template <typename Exec>
void register_kernels(torch::Library& m) {
  m.impl("belay_step_", &belay::belay_step<Exec>);
  m.impl("belay_step_foreach_", &belay::belay_step_foreach<Exec>);
}

}  // namespace

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) { register_kernels<belay::CpuExec>(m); }
TORCH_LIBRARY_IMPL(belay_kernels_grid, CPU, m) { register_kernels<belay::SimulatedGridExec>(m); }
