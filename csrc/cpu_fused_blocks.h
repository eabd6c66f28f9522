// The fused optimizer steps (AdamAverageOp, SgdAverageOp) on the CPU, a block at a time.
//
// Element by element (their apply<1>), the compiler does not vectorize them: every element
// tests the step's flags (weight decay, maximize, AMSGrad, GradScaler's unscale), the
// average's kind, its profiles and the non-finite policy, though they are fixed for the
// whole call. Here a block's elements go through the step one torch op (or a few that take
// no flag) at a time, each a loop of its own over the block, with the flags tested once per
// block outside the loops: each loop is a handful of vector instructions, and the block's
// values wait in small arrays in L1 between them. Every tensor is still read and written
// once per element.
//
// The math is belay_math.h's, element for element as apply() does it, and each function
// rounds once whatever the vector width (explicit fma, no contraction: see belay_math.h's
// ``product``), so the bits are apply()'s at any width and thread count. The simulated
// CUDA grid and the CUDA kernels keep apply().
#pragma once

#include <cstdint>

#include "element_ops.h"

namespace belay {

template <typename Op>
constexpr bool is_fused_step = false;
template <typename P, typename S>
constexpr bool is_fused_step<AdamAverageOp<P, S>> = true;
template <typename P, typename S>
constexpr bool is_fused_step<SgdAverageOp<P, S>> = true;

// Every function here is always inlined (BK_HD), so that cpu_loop_avx2 compiles it for
// AVX2, and so that the flags it branches on are the resolved op's, known per block.

// to[k] = from[k] converted, for k in [0, n).
template <typename From, typename To>
BK_HD void convert(const From* from, To* to, int64_t n) {
  for (int64_t k = 0; k < n; ++k) to[k] = static_cast<To>(from[k]);
}

// The gradient as the step takes it (incoming_grad): unscaled by GradScaler's factor and
// written back, then negated for maximize.
template <typename P, typename T>
BK_HD void incoming_grads(P* grad, T* g, int64_t n, const AmpScalars& amp, bool maximize) {
  convert(grad, g, n);
  if (amp.unscales) {
    const T unscale = static_cast<T>(amp.unscale);
    for (int64_t k = 0; k < n; ++k) {
      g[k] = scaled<P>(g[k], unscale);
      grad[k] = static_cast<P>(g[k]);
    }
  }
  if (maximize) {
    for (int64_t k = 0; k < n; ++k) g[k] = -g[k];
  }
}

// --- the average (FusedAverage::apply) ---------------------------------------------------------

// One shadow updated toward the new weights w by ``rule`` (update_shadow); kSkip: the
// non-finite policy. Returns the elements kept.
template <bool kSkip, typename S, typename T, typename Rule>
BK_HD int64_t update_shadows(S* shadow, const T* w, int64_t n, const Rule& rule) {
  int32_t skipped = 0;  // 32 bits: see cpu_loops.h's kBlock
  for (int64_t k = 0; k < n; ++k) skipped += update_shadow(shadow[k], w[k], kSkip, rule);
  return skipped;
}

// BELAY (FusedAverage::spring): w <- lerp(w, s, beta); s <- lerp(s, x, alpha), where x is
// the new weights, or for the poster's form (kPoster) the weights from before the step.
template <bool kSkip, bool kPoster, typename S, typename T>
BK_HD int64_t spring_shadows(S* shadow, T* w, const T* before, int64_t n, T alpha, T beta) {
  int32_t skipped = 0;
  for (int64_t k = 0; k < n; ++k) {
    const T s = static_cast<T>(shadow[k]);
    const T followed = kPoster ? before[k] : w[k];
    const bool keep = keeps_old_shadow(followed, kSkip);
    skipped += keep;
    w[k] = belay_weights(w[k], s, beta);
    const S updated = static_cast<S>(belay_shadow(s, followed, alpha));
    shadow[k] = keep ? shadow[k] : updated;
  }
  return skipped;
}

template <bool kSkip, typename S, typename T>
BK_HD int64_t average_block(const FusedAverage<S, T>& average, int64_t begin, T* w,
                            const T* before, int64_t n) {
  switch (average.kind) {
    case AverageKind::kEma: {
      int64_t skipped = 0;
      for (int p = 0; p < average.profiles; ++p) {
        skipped += update_shadows<kSkip>(average.shadows[p] + begin, w, n,
                                         EmaRule<T>{{0.0, nullptr}, average.rates[p]});
      }
      return skipped;
    }
    case AverageKind::kSwa:
      return update_shadows<kSkip>(average.shadows[0] + begin, w, n,
                                   SwaRule<T>{{0, nullptr}, average.rates[0]});
    case AverageKind::kBelay:
      return spring_shadows<kSkip, false>(average.shadows[0] + begin, w, before, n,
                                          average.rates[0], average.rates[1]);
    case AverageKind::kPoster:
      return spring_shadows<kSkip, true>(average.shadows[0] + begin, w, before, n,
                                         average.rates[0], average.rates[1]);
    default:
      return 0;
  }
}

// The average of elements [begin, begin + n) toward the new weights w, which BELAY changes;
// ``before``: the weights from before the step. Returns the elements kept.
template <typename S, typename T>
BK_HD int64_t average_block(const FusedAverage<S, T>& average, int64_t begin, T* w,
                            const T* before, int64_t n) {
  return average.skip_nonfinite ? average_block<true>(average, begin, w, before, n)
                                : average_block<false>(average, begin, w, before, n);
}

// --- Adam and AdamW (AdamAverageOp::step) ------------------------------------------------------

// The moments, the denominator and the parameter's update: w <- w + neg_step_size * m /
// denominator, with the moments read and written in place. kAmsgrad: the denominator
// takes the running maximum of the second moments.
template <bool kAmsgrad, typename P, typename S, typename T>
BK_HD void adam_moments(const AdamAverageOp<P, S>& op, int64_t begin, const T* g, T* w,
                        int64_t n) {
  P* exp_avg = op.exp_avg + begin;
  P* exp_avg_sq = op.exp_avg_sq + begin;
  P* max_exp_avg_sq = op.max_exp_avg_sq + begin;
  // Held in locals, so the loop's stores cannot be taken to change them.
  const T one_minus_beta1 = op.one_minus_beta1;
  const T beta2 = op.beta2;
  const T one_minus_beta2 = op.one_minus_beta2;
  const T bias_correction2_sqrt = op.steps.bias_correction2_sqrt;
  const T eps = op.eps;
  const T neg_step_size = op.steps.neg_step_size;
  for (int64_t k = 0; k < n; ++k) {
    const T m = lerped<P>(static_cast<T>(exp_avg[k]), g[k], one_minus_beta1);
    T v = add_squared<P>(scaled<P>(static_cast<T>(exp_avg_sq[k]), beta2), g[k], one_minus_beta2);
    exp_avg[k] = static_cast<P>(m);
    exp_avg_sq[k] = static_cast<P>(v);
    if constexpr (kAmsgrad) {
      v = maximum(static_cast<T>(max_exp_avg_sq[k]), v);
      max_exp_avg_sq[k] = static_cast<P>(v);
    }
    const T denominator = adam_denominator<P>(v, bias_correction2_sqrt, eps);
    w[k] = add_quotient<P>(w[k], m, denominator, neg_step_size);
  }
}

// Elements [begin, end) of a resolved AdamAverageOp, at most kBlock of them: apply()'s
// loads, step, average and stores. Returns the elements the average kept.
template <int64_t kBlock, typename P, typename S>
BK_HD int64_t fused_block(const AdamAverageOp<P, S>& op, int64_t begin, int64_t end) {
  using T = typename AdamAverageOp<P, S>::T;
  const int64_t n = end - begin;
  alignas(64) T before[kBlock];  // the weights from before the step
  alignas(64) T w[kBlock];       // the new weights
  alignas(64) T g[kBlock];       // the gradient as the step takes it
  incoming_grads<P>(op.grad + begin, g, n, op.amp, op.maximize);
  convert(op.param + begin, before, n);
  if (op.decays && op.decoupled) {  // AdamW: param.mul_(1 - lr * weight_decay)
    const T decay_factor = op.decay_factor;
    for (int64_t k = 0; k < n; ++k) w[k] = scaled<P>(before[k], decay_factor);
  } else {
    for (int64_t k = 0; k < n; ++k) w[k] = before[k];
  }
  if (op.decays && !op.decoupled) {  // Adam: grad.add(param, alpha=weight_decay)
    const T weight_decay = op.weight_decay;
    for (int64_t k = 0; k < n; ++k) g[k] = add_scaled<P>(g[k], before[k], weight_decay);
  }
  if (op.amsgrad) {
    adam_moments<true>(op, begin, g, w, n);
  } else {
    adam_moments<false>(op, begin, g, w, n);
  }
  const int64_t skipped = average_block(op.average, begin, w, before, n);
  convert(w, op.param + begin, n);
  return skipped;
}

// --- SGD (SgdAverageOp::step) ------------------------------------------------------------------

// The momentum buffer's update, and the step's direction g: grad.add(buf, alpha=momentum)
// for Nesterov (kNesterov), else buf itself. On the first step the buffers take the
// gradient.
template <bool kNesterov, typename P, typename S, typename T>
BK_HD void sgd_momentum(const SgdAverageOp<P, S>& op, int64_t begin, T* g, int64_t n) {
  P* buffer = op.momentum_buffer + begin;
  const T momentum = op.momentum;
  const T one_minus_dampening = op.one_minus_dampening;
  if (op.first_step) {
    convert(g, buffer, n);
    if constexpr (kNesterov) {
      for (int64_t k = 0; k < n; ++k) g[k] = add_scaled<P>(g[k], g[k], momentum);
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    const T buf =
        add_scaled<P>(scaled<P>(static_cast<T>(buffer[k]), momentum), g[k], one_minus_dampening);
    buffer[k] = static_cast<P>(buf);
    g[k] = kNesterov ? add_scaled<P>(g[k], buf, momentum) : buf;
  }
}

// Elements [begin, end) of a resolved SgdAverageOp, at most kBlock of them, as
// fused_block(AdamAverageOp) does them.
template <int64_t kBlock, typename P, typename S>
BK_HD int64_t fused_block(const SgdAverageOp<P, S>& op, int64_t begin, int64_t end) {
  using T = typename SgdAverageOp<P, S>::T;
  const int64_t n = end - begin;
  alignas(64) T before[kBlock];
  alignas(64) T w[kBlock];
  alignas(64) T g[kBlock];
  incoming_grads<P>(op.grad + begin, g, n, op.amp, op.maximize);
  convert(op.param + begin, before, n);
  if (op.decays) {  // grad.add(param, alpha=weight_decay)
    const T weight_decay = op.weight_decay;
    for (int64_t k = 0; k < n; ++k) g[k] = add_scaled<P>(g[k], before[k], weight_decay);
  }
  if (op.has_momentum) {
    if (op.nesterov) {
      sgd_momentum<true>(op, begin, g, n);
    } else {
      sgd_momentum<false>(op, begin, g, n);
    }
  }
  const T neg_lr = op.neg_lr;
  for (int64_t k = 0; k < n; ++k) w[k] = add_scaled<P>(before[k], g[k], neg_lr);
  const int64_t skipped = average_block(op.average, begin, w, before, n);
  convert(w, op.param + begin, n);
  return skipped;
}

}  // namespace belay
