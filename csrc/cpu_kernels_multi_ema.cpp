// The CPU op multi-profile EMA (the loops: cpu_loops.h), in a file of its own: one kernel
// per profile count makes it the slowest to compile.
#include "cpu_loops.h"

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) {
  m.impl("multi_ema_update_", BELAY_CPU_ENTRY(multi_ema_update_));
  m.impl("multi_ema_update_foreach_", BELAY_CPU_ENTRY(multi_ema_update_foreach_));
}
