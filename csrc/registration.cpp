// The ops' schemas, one literal per op, each on one line however long, so that it greps
// whole. Mutated tensors are marked Tensor(a!), Tensor(b!), ...; hyperparameters come as a
// number plus an optional one-element tensor that, when given, replaces the number and is
// read by the kernel itself (so a CUDA graph can replay with new values). The entry points
// with these signatures are in op_entries.h, registered by cpu_kernels*.cpp and
// cuda_kernels.cu; the fake (meta) implementations are in
// belay_kernels/backend/_library.py.
//
// belay_kernels_grid declares the same ops for the tests: its CPU kernels run the CUDA
// kernels' bodies over a simulated grid (cpu_loops.h), so the production ops carry no
// switch for it.
#include <torch/library.h>

namespace {

void define_ops(torch::Library& m) {
  m.def("ema_update_(Tensor(a!) shadow, Tensor weights, float decay, Tensor? decay_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def("ema_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, float decay, Tensor? decay_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  // shadows: the K profiles' shadows (the list op: each profile's N, one profile after
  // the other); decay_tensors: empty, or one (a tensor or None) per decay.
  m.def("multi_ema_update_(Tensor(a!)[] shadows, Tensor weights, float[] decays, Tensor?[] decay_tensors, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def("multi_ema_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, float[] decays, Tensor?[] decay_tensors, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def("swa_update_(Tensor(a!) shadow, Tensor weights, int count, Tensor? count_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def("swa_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, int count, Tensor? count_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def("belay_step_(Tensor(a!) weights, Tensor(b!) shadow, float alpha, float beta, Tensor? alpha_tensor, Tensor? beta_tensor, bool skip_nonfinite, Tensor(c!)? skipped) -> ()");
  m.def("belay_step_foreach_(Tensor(a!)[] weights, Tensor(b!)[] shadows, float alpha, float beta, Tensor? alpha_tensor, Tensor? beta_tensor, bool skip_nonfinite, Tensor(c!)? skipped) -> ()");
  m.def("two_point_average_(Tensor(a!) out, Tensor weights, Tensor snapshot) -> ()");
  m.def("two_point_average_foreach_(Tensor(a!)[] outs, Tensor[] weights, Tensor[] snapshots) -> ()");
  m.def("swap_(Tensor(a!) weights, Tensor(b!) shadow, bool inverse) -> ()");
  m.def("swap_foreach_(Tensor(a!)[] weights, Tensor(b!)[] shadows, bool inverse) -> ()");
  // The fused optimizer step and average (reference.adam_average_, sgd_average_): shadows
  // are K profiles of len(params) tensors, profile after profile.
  m.def("adam_average_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, Tensor(g!)[] shadows, Tensor? grad_scale, Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize, str average, float[] average_scalars, bool skip_nonfinite, Tensor(h!)? skipped) -> ()");
  m.def("sgd_average_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] shadows, Tensor? grad_scale, Tensor? found_inf, float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, str average, float[] average_scalars, bool skip_nonfinite, Tensor(e!)? skipped) -> ()");
}

}  // namespace

TORCH_LIBRARY(belay_kernels, m) { define_ops(m); }
TORCH_LIBRARY(belay_kernels_grid, m) { define_ops(m); }
