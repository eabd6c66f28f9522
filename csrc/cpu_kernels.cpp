// The CPU ops EMA and SWA (the loops: cpu_loops.h), and the simulated grid's setting.
// Each cpu_kernels*.cpp instantiates a few ops, so that the build compiles them in parallel.
#include "cpu_loops.h"

namespace belay {

void set_simulated_grid(int64_t blocks, int64_t threads, int64_t chunk) {
  TORCH_CHECK_VALUE(blocks >= 0 && threads >= 0 && chunk % 16 == 0 && (blocks == 0 || chunk > 0),
                    "_simulate_cuda_grid: need blocks >= 0, threads >= 0 and a chunk that "
                    "is a positive multiple of 16 elements.");
  simulated_grid() = SimulatedGrid{blocks, threads, chunk};
}

}  // namespace belay

namespace {

// The ops this file instantiates, for the CPU (CpuExec) and for the tests'
// belay_kernels_grid (SimulatedGridExec, the CUDA kernels' bodies on a simulated grid).
template <typename Exec>
void register_kernels(torch::Library& m) {
  m.impl("ema_update_", &belay::ema_update<Exec>);
  m.impl("ema_update_foreach_", &belay::ema_update_foreach<Exec>);
  m.impl("swa_update_", &belay::swa_update<Exec>);
  m.impl("swa_update_foreach_", &belay::swa_update_foreach<Exec>);
}

}  // namespace

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) { register_kernels<belay::CpuExec>(m); }
TORCH_LIBRARY_IMPL(belay_kernels_grid, CPU, m) { register_kernels<belay::SimulatedGridExec>(m); }
