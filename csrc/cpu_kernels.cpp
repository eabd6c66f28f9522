// The CPU ops EMA and SWA (the loops: cpu_loops.h), and the simulated grid's switch.
#include "cpu_loops.h"

namespace belay {

void set_simulated_grid(int64_t blocks, int64_t threads, int64_t chunk) {
  TORCH_CHECK_VALUE(blocks >= 0 && threads >= 0 && chunk % 16 == 0 && (blocks == 0 || chunk > 0),
                    "_simulate_cuda_grid: need blocks >= 0, threads >= 0 and a chunk that "
                    "is a positive multiple of 16 elements.");
  simulated_grid() = SimulatedGrid{blocks, threads, chunk};
}

}  // namespace belay

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) {
  m.impl("ema_update_", BELAY_CPU_ENTRY(ema_update_));
  m.impl("ema_update_foreach_", BELAY_CPU_ENTRY(ema_update_foreach_));
  m.impl("swa_update_", BELAY_CPU_ENTRY(swa_update_));
  m.impl("swa_update_foreach_", BELAY_CPU_ENTRY(swa_update_foreach_));
}
