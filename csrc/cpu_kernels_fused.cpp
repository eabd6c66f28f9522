// The CPU ops of the fused optimizer step and average, adam_average_ and sgd_average_
// (the loops: cpu_loops.h).
#include "cpu_loops.h"

namespace {

// As in cpu_kernels.cpp: the CPU kernels and their simulated-grid twins.
template <typename Exec>
void register_kernels(torch::Library& m) {
  m.impl("adam_average_", &belay::adam_average<Exec>);
  m.impl("sgd_average_", &belay::sgd_average<Exec>);
}

}  // namespace

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) { register_kernels<belay::CpuExec>(m); }
TORCH_LIBRARY_IMPL(belay_kernels_grid, CPU, m) { register_kernels<belay::SimulatedGridExec>(m); }
