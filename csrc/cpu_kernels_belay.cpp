// The CPU op BELAY (the loops: cpu_loops.h). One file per op group, so that the build
// compiles them in parallel.
#include "cpu_loops.h"

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) {
  m.impl("belay_step_", BELAY_CPU_ENTRY(belay_step_));
  m.impl("belay_step_foreach_", BELAY_CPU_ENTRY(belay_step_foreach_));
}
