// The ops' schemas. Mutated tensors are marked Tensor(a!); hyperparameters come as a
// number plus an optional one-element tensor that, when given, replaces the number and
// is read by the kernel itself (so a CUDA graph can replay with new values).
// The CPU implementations are in cpu_kernels.cpp, the CUDA ones in cuda_kernels.cu, and
// the fake (meta) ones in belay_kernels/extension/_library.py.
#include <torch/library.h>

TORCH_LIBRARY(belay_kernels, m) {
  m.def(
      "ema_update_(Tensor(a!) shadow, Tensor weights, float decay, Tensor? decay_tensor, "
      "bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def(
      "ema_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, float decay, "
      "Tensor? decay_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  // K shadows of one weights tensor; decay_tensors is empty or has one entry per decay.
  // The list op takes the K profiles' shadow lists one after the other.
  m.def(
      "multi_ema_update_(Tensor(a!)[] shadows, Tensor weights, float[] decays, "
      "Tensor?[] decay_tensors, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def(
      "multi_ema_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, float[] decays, "
      "Tensor?[] decay_tensors, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def(
      "swa_update_(Tensor(a!) shadow, Tensor weights, int count, Tensor? count_tensor, "
      "bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def(
      "swa_update_foreach_(Tensor(a!)[] shadows, Tensor[] weights, int count, "
      "Tensor? count_tensor, bool skip_nonfinite, Tensor(b!)? skipped) -> ()");
  m.def(
      "belay_step_(Tensor(a!) weights, Tensor(b!) shadow, float alpha, float beta, "
      "Tensor? alpha_tensor, Tensor? beta_tensor, bool skip_nonfinite, "
      "Tensor(c!)? skipped) -> ()");
  m.def(
      "belay_step_foreach_(Tensor(a!)[] weights, Tensor(b!)[] shadows, float alpha, "
      "float beta, Tensor? alpha_tensor, Tensor? beta_tensor, bool skip_nonfinite, "
      "Tensor(c!)? skipped) -> ()");
  m.def("two_point_average_(Tensor(a!) out, Tensor weights, Tensor snapshot) -> ()");
  m.def(
      "two_point_average_foreach_(Tensor(a!)[] outs, Tensor[] weights, Tensor[] snapshots) "
      "-> ()");
  m.def("swap_(Tensor(a!) weights, Tensor(b!) shadow, bool inverse) -> ()");
  m.def("swap_foreach_(Tensor(a!)[] weights, Tensor(b!)[] shadows, bool inverse) -> ()");
}
