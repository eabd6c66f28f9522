// The CPU op multi-profile EMA (the loops: cpu_loops.h), in a file of its own: one kernel
// per profile count makes it the slowest to compile.
#include "cpu_loops.h"

namespace {

// As in cpu_kernels.cpp: the CPU kernels and their simulated-grid twins.
template <typename Exec>
void register_kernels(torch::Library& m) {
  m.impl("multi_ema_update_", &belay::multi_ema_update<Exec>);
  m.impl("multi_ema_update_foreach_", &belay::multi_ema_update_foreach<Exec>);
}

}  // namespace

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) { register_kernels<belay::CpuExec>(m); }
TORCH_LIBRARY_IMPL(belay_kernels_grid, CPU, m) { register_kernels<belay::SimulatedGridExec>(m); }
