// The CPU ops two-point average and swap (the loops: cpu_loops.h).
#include "cpu_loops.h"

BELAY_CPU_KERNELS(belay::TwoPointAverage, belay::Swap)
