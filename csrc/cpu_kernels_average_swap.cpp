// The CPU ops two-point average and swap (the loops: cpu_loops.h).
#include "cpu_loops.h"

namespace {

// As in cpu_kernels.cpp: the CPU kernels and their simulated-grid twins.
template <typename Exec>
void register_kernels(torch::Library& m) {
  m.impl("two_point_average_", &belay::two_point_average<Exec>);
  m.impl("two_point_average_foreach_", &belay::two_point_average_foreach<Exec>);
  m.impl("swap_", &belay::swap<Exec>);
  m.impl("swap_foreach_", &belay::swap_foreach<Exec>);
}

}  // namespace

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) { register_kernels<belay::CpuExec>(m); }
TORCH_LIBRARY_IMPL(belay_kernels_grid, CPU, m) { register_kernels<belay::SimulatedGridExec>(m); }
