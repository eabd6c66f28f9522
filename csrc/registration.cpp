// The ops' schemas, generated from BELAY_OPS (op_entries.h). Mutated tensors are marked
// Tensor(a!); hyperparameters come as a number plus an optional one-element tensor that,
// when given, replaces the number and is read by the kernel itself (so a CUDA graph can
// replay with new values). The fake (meta) implementations are in
// belay_kernels/extension/_library.py.
//
// belay_kernels_grid declares the same ops for the tests: its CPU kernels run the CUDA
// kernels' bodies over a simulated grid (cpu_loops.h), so the production ops carry no
// switch for it.
#include <torch/library.h>

#include "op_entries.h"

namespace {

void define_ops(torch::Library& m) {
#define BELAY_DEFINE(Op)                      \
  m.def(::belay::schema<::belay::Op>(false).c_str()); \
  m.def(::belay::schema<::belay::Op>(true).c_str());
  BELAY_OPS(BELAY_DEFINE)
#undef BELAY_DEFINE
}

}  // namespace

TORCH_LIBRARY(belay_kernels, m) { define_ops(m); }
TORCH_LIBRARY(belay_kernels_grid, m) { define_ops(m); }
