// The CPU ops two-point average and swap (the loops: cpu_loops.h).
#include "cpu_loops.h"

TORCH_LIBRARY_IMPL(belay_kernels, CPU, m) {
  m.impl("two_point_average_", BELAY_CPU_ENTRY(two_point_average_));
  m.impl("two_point_average_foreach_", BELAY_CPU_ENTRY(two_point_average_foreach_));
  m.impl("swap_", BELAY_CPU_ENTRY(swap_));
  m.impl("swap_foreach_", BELAY_CPU_ENTRY(swap_foreach_));
}
