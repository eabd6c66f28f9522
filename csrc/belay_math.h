// The per-element update math of every method, written once for the C++ and CUDA code.
//
// Each function works on one element in opmath (float, or double for float64 tensors);
// loading, upcasting, downcasting and storing belong to the callers (element_ops.h).
// The formulas are those of belay_kernels/reference.py, which is the spec; ``lerp`` is
// torch.lerp's two-sided form, so a kernel rounds as the reference does.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BK_HD __host__ __device__ __forceinline__
#else
#define BK_HD inline __attribute__((always_inline))
#endif

namespace belay {

// a * b + c rounded once. On the CPU it is written as fma rather than left to GCC's
// contraction, which fuses only in the clones built for FMA instructions: so the baseline
// and vector clones give the same bits (on a CPU without FMA, the C library's fma: exact,
// not vectorized). nvcc contracts a * b + c into one fma itself (--fmad=true, its
// default); left to it, the BELAY kernels keep their registers, where an explicit fmaf
// made ptxas spill (tests/test_extension_ptx.py).
BK_HD float multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return a * b + c;
#else
  return fmaf(a, b, c);
#endif
}
BK_HD double multiply_add(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return a * b + c;
#else
  return fma(a, b, c);
#endif
}

// lerp (below) for a weight under 0.5, where lerp is this side alone: a loop whose weights
// are all known to be under 0.5 calls it and skips the other side and both selections.
template <typename T>
BK_HD T lerp_below_half(T start, T end, T weight) {
  return multiply_add(weight, end - start, start);
}

// torch.lerp's two-sided form, except that a weight of exactly 1 copies ``end`` even over
// a non-finite ``start`` (where torch.lerp gives NaN): the first SWA update and a zero
// decay are copies. Each side is one fused multiply-add, as in ATen's vectorized lerp.
// Both sides are computed and then selected: GCC does not if-convert a branch between
// two fma calls, and left as a branch the BELAY loops did not vectorize.
template <typename T>
BK_HD T lerp(T start, T end, T weight) {
  const T difference = end - start;
  const T from_start = lerp_below_half(start, end, weight);
  const T from_end = multiply_add(-difference, T(1) - weight, end);
  const T blended = weight < T(0.5) ? from_start : from_end;
  return weight == T(1) ? end : blended;
}

// Whether a rate (decay, alpha, beta) is in [0, 1]; false for NaN. A rate held in a tensor
// is only known on the device, where an invalid one leaves every element as it was.
BK_HD bool is_rate(double x) {
  return x >= 0.0 && x <= 1.0;
}

// x - x is 0 for every finite x and NaN for NaN and +-inf; no library call, so it is the
// same test on host and device and the compiler vectorizes it.
template <typename T>
BK_HD bool is_finite(T x) {
  return x - x == T(0);
}

// The non-finite policy: with ``skip`` an element whose incoming weight is NaN or inf
// keeps its previous shadow (and the caller counts it).
template <typename T>
BK_HD bool keeps_old_shadow(T weights, bool skip) {
  return skip && !is_finite(weights);
}

// EMA: shadow <- lerp(shadow, weights, rate), rate = 1 - decay.
template <typename T>
BK_HD T ema_shadow(T shadow, T weights, T rate) {
  return lerp(shadow, weights, rate);
}

// SWA: ``count`` models are already in the shadow. The running mean is a lerp toward
// the new model with weight 1 / (count + 1): the first model (weight 1) is copied
// exactly, and the rest differ from the reference's division by about an ulp. A lerp
// vectorizes where a division by a loop-invariant count did not.
template <typename T>
BK_HD T swa_weight(int64_t count) {
  return static_cast<T>(1.0 / static_cast<double>(count + 1));
}
template <typename T>
BK_HD T swa_shadow(T shadow, T weights, T weight_of_new) {
  return lerp(shadow, weights, weight_of_new);
}

// BELAY, post-step form; both right-hand sides use the values from before the call.
template <typename T>
BK_HD T belay_weights(T weights, T shadow, T beta) {
  return lerp(weights, shadow, beta);
}
template <typename T>
BK_HD T belay_shadow(T shadow, T weights, T alpha) {
  return lerp(shadow, weights, alpha);
}

// --- the optimizers' steps (reference.adam_average_, sgd_average_) ---------------------
// torch's single-tensor Adam/AdamW and SGD round the result of every tensor op to the
// parameters' dtype R, each op's math running in opmath T (float for 16-bit parameters).
// Each function below is one such op, rounded as torch's CPU kernel rounds it (measured
// on AVX-512 ATen; tests/test_extension_fused.py compares them bit for bit).

// x rounded to R and back: the result of one torch op stored in the parameters' dtype.
template <typename R, typename T>
BK_HD T rounded(T x) {
  return static_cast<T>(static_cast<R>(x));
}

// a * b rounded once, as an op of its own. On the CPU it is an fma with a -0 addend, which
// is exactly the product (the sign of a zero included): GCC contracts a plain product into
// an add that follows it (-ffp-contract=fast, its default for C++) where R is T and the
// rounding between them is no instruction, and torch's separate ops never fuse them. On
// the device the product is written with the intrinsic nvcc never contracts.
BK_HD float product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return fmaf(a, b, -0.0f);
#endif
}
BK_HD double product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return fma(a, b, -0.0);
#endif
}

// x.mul(a)
template <typename R, typename T>
BK_HD T scaled(T x, T a) {
  return rounded<R>(product(x, a));
}

// x.add(y, alpha=a): ATen's fmadd(y, a, x), one rounding; alpha is first rounded to the
// tensor's dtype (for bf16/fp16 tensors ATen takes it as scalar_t, unlike the scalars of
// its other ops, which stay in opmath).
template <typename R, typename T>
BK_HD T add_scaled(T x, T y, T a) {
  return rounded<R>(multiply_add(y, rounded<R>(a), x));
}

// x.lerp(end, weight), with belay_math's lerp (torch's two-sided form).
template <typename R, typename T>
BK_HD T lerped(T x, T end, T weight) {
  return rounded<R>(lerp(x, end, weight));
}

// x.addcmul(y, y, value=a): ATen's x + a * y * y, the last product fused with the add.
template <typename R, typename T>
BK_HD T add_squared(T x, T y, T a) {
  return rounded<R>(multiply_add(product(a, y), y, x));
}

// x.addcdiv(y, z, value=a): ATen's x + a * y / z, no fma.
template <typename R, typename T>
BK_HD T add_quotient(T x, T y, T z, T a) {
  return rounded<R>(x + product(a, y) / z);
}

// torch.maximum: NaN when either is NaN.
template <typename T>
BK_HD T maximum(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Adam's denominator, (sqrt(v) / bias_correction2_sqrt).add_(eps): three ops.
template <typename R, typename T>
BK_HD T adam_denominator(T second_moment, T bias_correction2_sqrt, T eps) {
  const T root = rounded<R>(static_cast<T>(std::sqrt(second_moment)));
  return rounded<R>(rounded<R>(root / bias_correction2_sqrt) + eps);
}

// Adam's bias corrections for the step count ``step`` (>= 1), in float64 as torch's
// single-tensor Adam computes them from Python floats: ``-lr / (1 - beta1 ** step)`` and
// ``(1 - beta2 ** step) ** 0.5``, where ``** 0.5`` is the C library's pow, not sqrt (they
// can differ in the last bit). On the device pow is CUDA's, within 1 ulp of glibc's.
struct AdamBias {
  double neg_step_size;
  double bias_correction2_sqrt;
};
BK_HD AdamBias adam_bias(double lr, double beta1, double beta2, double step) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  return {-(lr / bias_correction1), std::pow(bias_correction2, 0.5)};
}

// Two-point average.
template <typename T>
BK_HD T two_point(T weights, T snapshot) {
  return (weights + snapshot) * T(0.5);
}

// Exact swap of bf16 weights with an fp32 shadow, on the raw bits (see the comment in
// reference.py): the model slot gets the shadow rounded to bf16 (to nearest, ties toward
// zero), NaN kept NaN; the shadow slot keeps the shadow's low 16 bits under the live
// weights' bits. ``inverse`` restores both words.
constexpr uint32_t kBf16Sign = 0x8000u;
constexpr uint32_t kBf16Inf = 0x7F80u;       // a magnitude above it is a NaN
constexpr uint32_t kBf16SpareNan = 0x7F81u;  // the NaN high half that lends its code

// Whether the shadow's low half ``low`` (below 0x10000) rounds its high half up, low > 0x8000,
// in arithmetic: GCC 12 does not vectorize the swap's loop with the unsigned comparison.
BK_HD uint32_t rounds_up_of(uint32_t low) { return (low + 0x7FFFu) >> 16; }

BK_HD uint32_t packed_model_bits(uint32_t high, uint32_t low) {
  const uint32_t rounds_up = rounds_up_of(low);
  const uint32_t sign = high & kBf16Sign;
  const uint32_t magnitude = high & 0x7FFFu;
  const uint32_t traded = magnitude == kBf16Inf        ? (sign | kBf16SpareNan)
                          : magnitude == kBf16SpareNan ? (sign | (rounds_up ? 0u : kBf16Inf))
                                                       : high;
  const bool exchanged = magnitude >= kBf16Inf && low != 0u;
  return exchanged ? traded : high + rounds_up;
}

BK_HD uint32_t packed_shadow_high(uint32_t model, uint32_t low) {
  const uint32_t rounds_up = rounds_up_of(low);
  const uint32_t sign = model & kBf16Sign;
  const uint32_t magnitude = model & 0x7FFFu;
  const uint32_t restored =
      magnitude > kBf16Inf ? (magnitude == kBf16SpareNan ? (sign | kBf16Inf) : model)
      : magnitude == (rounds_up ? 0u : kBf16Inf) ? (sign | kBf16SpareNan)
                                                 : model - rounds_up;
  return (low != 0u ? restored : model) & 0xFFFFu;
}

BK_HD void swap_packed(uint16_t& model_bits, uint32_t& slot_bits, bool inverse) {
  const uint32_t low = slot_bits & 0xFFFFu;
  const uint32_t high = slot_bits >> 16;
  const uint32_t model = model_bits;
  if (!inverse) {
    model_bits = static_cast<uint16_t>(packed_model_bits(high, low));
    slot_bits = (model << 16) | low;
  } else {
    model_bits = static_cast<uint16_t>(high);
    slot_bits = (packed_shadow_high(model, low) << 16) | low;
  }
}

}  // namespace belay
