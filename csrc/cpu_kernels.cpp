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

BELAY_CPU_KERNELS(belay::EmaUpdate, belay::SwaUpdate)
