// The CPU op BELAY (the loops: cpu_loops.h).
#include "cpu_loops.h"

BELAY_CPU_KERNELS(belay::BelayStep)
