// The CPU op multi-profile EMA (the loops: cpu_loops.h), in a file of its own: one kernel
// per profile count makes it the slowest to compile.
#include "cpu_loops.h"

BELAY_CPU_KERNELS(belay::MultiEmaUpdate)
