// One functor per method: the tensors' addresses and scalars of one call, and ``apply<N>``,
// which loads N elements of every tensor, runs belay_math.h on each, and stores the result.
// N is 1 (scalar path, and the CPU loops) or kVec (the aligned 128-bit path, and the CPU
// loop's streamed fp32/fp64 two-point output). ``apply<N, U>(i, stride)`` does U groups of
// N at i, i + stride, ...: a GPU thread's strided vectors, every load issued before any
// store, so U vectors per tensor are in flight at once.
// ``tensors()`` lists the addresses, const where the op only reads; the loops derive
// alignment and prefetching from it. An op with ``kStreamsOutput`` lists first an output
// that it only writes (the CPU loop computes a block of it into a small buffer, then
// streams it to the output past the cache).
// ``with_tensors(...)`` is the same op (same scalars) on other addresses, given in the
// order of tensors(), possibly of other storage types: the CPU loop runs it on a block's
// buffers (in float for fp16 storage, which it widens and rounds back in bulk).
// The functors are plain structs, so a kernel launch can take them by value.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "belay_math.h"
#include "profiles.h"

#if defined(__CUDA_ARCH__)
#define BK_UNROLL _Pragma("unroll")
#else
#define BK_UNROLL
#endif

namespace belay {

// Math in float64 when any tensor is float64, in float32 otherwise (as the reference).
template <typename... Storage>
using opmath_t =
    std::conditional_t<(std::is_same_v<Storage, double> || ...), double, float>;

constexpr int kVectorBytes = 16;

// Elements per vector step: enough that every tensor moves whole 16-byte words.
template <typename... Storage>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(std::min({sizeof(Storage)...}));
}

template <typename T>
struct alignas(kVectorBytes) Word16 {
  T value[kVectorBytes / sizeof(T)];
};

template <typename T>
BK_HD bool is_aligned16(const T* address) {
  return reinterpret_cast<uintptr_t>(address) % kVectorBytes == 0;
}

// N elements from ``source`` to registers; N > 1 requires 16-byte alignment.
template <int N, typename T>
BK_HD void load(const T* source, T (&values)[N]) {
  if constexpr (N == 1) {
    values[0] = source[0];
  } else {
    constexpr int kPerWord = kVectorBytes / sizeof(T);
    static_assert(N % kPerWord == 0, "vector width must cover whole 16-byte words");
    BK_UNROLL
    for (int word = 0; word < N / kPerWord; ++word) {
      const Word16<T> loaded = reinterpret_cast<const Word16<T>*>(source)[word];
      BK_UNROLL
      for (int k = 0; k < kPerWord; ++k) values[word * kPerWord + k] = loaded.value[k];
    }
  }
}

template <int N, typename T>
BK_HD void store(T* target, const T (&values)[N]) {
  if constexpr (N == 1) {
    target[0] = values[0];
  } else {
    constexpr int kPerWord = kVectorBytes / sizeof(T);
    BK_UNROLL
    for (int word = 0; word < N / kPerWord; ++word) {
      Word16<T> packed;
      BK_UNROLL
      for (int k = 0; k < kPerWord; ++k) packed.value[k] = values[word * kPerWord + k];
      reinterpret_cast<Word16<T>*>(target)[word] = packed;
    }
  }
}

// The u-th group of N elements of an array of U groups.
template <int N, typename T, int M>
BK_HD T (&group(T (&values)[M], int u))[N] {
  static_assert(M % N == 0, "whole groups");
  return *reinterpret_cast<T(*)[N]>(values + u * N);
}

// U groups of N elements, group u at source + u * stride.
template <int N, int U, typename T>
BK_HD void load_groups(const T* source, T (&values)[N * U], int64_t stride) {
  BK_UNROLL
  for (int u = 0; u < U; ++u) load<N>(source + u * stride, group<N>(values, u));
}

template <int N, int U, typename T>
BK_HD void store_groups(T* target, const T (&values)[N * U], int64_t stride) {
  BK_UNROLL
  for (int u = 0; u < U; ++u) store<N>(target + u * stride, group<N>(values, u));
}

// load_groups for a tensor the op only reads. On the GPU its 16-byte words go through the
// read-only (non-coherent) path, what ``const T* __restrict__`` would let the compiler
// choose: valid because no tensor of a call overlaps another (check_row refuses it), so
// nothing the kernel stores can change what it reads here.
template <int N, int U, typename T>
BK_HD void load_input_groups(const T* source, T (&values)[N * U], int64_t stride) {
#if defined(__CUDA_ARCH__)
  if constexpr (N > 1) {
    constexpr int kPerWord = kVectorBytes / sizeof(T);
    static_assert(N % kPerWord == 0, "vector width must cover whole 16-byte words");
    BK_UNROLL
    for (int u = 0; u < U; ++u) {
      BK_UNROLL
      for (int word = 0; word < N / kPerWord; ++word) {
        const uint4 bits = __ldg(reinterpret_cast<const uint4*>(source + u * stride) + word);
        Word16<T> loaded;
        memcpy(&loaded, &bits, kVectorBytes);
        BK_UNROLL
        for (int k = 0; k < kPerWord; ++k) {
          values[u * N + word * kPerWord + k] = loaded.value[k];
        }
      }
    }
    return;
  }
#endif
  load_groups<N, U>(source, values, stride);
}

// How an op's apply() stores its output: plainly, unless the caller passes another policy
// (the CPU loop passes non-temporal stores for an output it streams past the cache).
struct PlainStore {
  template <int N, typename T>
  BK_HD static void put(T* target, const T (&values)[N]) {
    store<N>(target, values);
  }
};

// Whether element i of every tensor of ``op`` starts a 16-byte word.
template <typename Op>
BK_HD bool aligned_at(const Op& op, int64_t i) {
  return std::apply([i](auto*... address) { return (is_aligned16(address + i) && ...); },
                    op.tensors());
}

// The first element in [begin, min(end, begin + kVec)) at which every tensor of ``op``
// starts a 16-byte word, or -1 where there is none (for tensors misaligned differently,
// there never is).
template <typename Op>
BK_HD int64_t first_aligned(const Op& op, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end && i < begin + Op::kVec; ++i) {
    if (aligned_at(op, i)) return i;
  }
  return -1;
}

template <typename Op>
constexpr bool streams_output = requires { requires Op::kStreamsOutput; };

// False when a resolved op's hyperparameters are out of range (ops without any: true).
template <typename Op>
BK_HD bool hparams_valid(const Op& op) {
  if constexpr (requires { op.hparams_valid(); }) {
    return op.hparams_valid();
  }
  return true;
}

// False when a resolved op is to write nothing at all this call (GradScaler found an inf
// in the gradients, a flag only the device knows): no element is counted skipped either.
template <typename Op>
BK_HD bool writes_anything(const Op& op) {
  if constexpr (requires { op.writes_anything(); }) {
    return op.writes_anything();
  }
  return true;
}

// A hyperparameter given as a number, or as the address of a one-element tensor that the
// kernel reads (so a CUDA graph can replay with a new value).
template <typename V>
struct ScalarArg {
  V value;
  const V* address;
  BK_HD V get() const { return address != nullptr ? *address : value; }
};

// The rules of the methods that update only the shadow, each with its hyperparameter.
// ``valid()`` is false for a hyperparameter out of range, possible only for one held in a
// tensor; such a call writes nothing and counts every element skipped. It rereads the
// value rather than storing a flag, so the functors (kernel arguments) keep their size.
template <typename T>
struct EmaRule {
  ScalarArg<double> decay;
  T rate;  // 1 - decay, set by resolved()
  // The value is read once and kept, so valid() needs no second read of a tensor.
  BK_HD EmaRule resolved() const {
    const double value = decay.get();
    return {{value, nullptr}, static_cast<T>(1.0 - value)};
  }
  BK_HD bool valid() const { return is_rate(decay.get()); }
  BK_HD T operator()(T shadow, T weights) const { return ema_shadow(shadow, weights, rate); }
};

// EmaRule for a rate known to be under 0.5 (see lerp_below_half).
template <typename T>
struct EmaBelowHalfRule {
  ScalarArg<double> decay;
  T rate;
  BK_HD T operator()(T shadow, T weights) const { return lerp_below_half(shadow, weights, rate); }
};

template <typename T>
struct SwaRule {
  ScalarArg<int64_t> count;
  T weight_of_new;  // 1 / (count + 1), set by resolved()
  BK_HD SwaRule resolved() const { return {count, swa_weight<T>(count.get())}; }
  BK_HD bool valid() const { return count.get() >= 0; }
  BK_HD T operator()(T shadow, T weights) const {
    return swa_shadow(shadow, weights, weight_of_new);
  }
};

// One element's next shadow: rule(shadow, weights), or the shadow itself where ``keep``.
template <typename S, typename T, typename Rule>
BK_HD S kept_or_updated(S shadow, T weights, bool keep, const Rule& rule) {
  const S updated = static_cast<S>(rule(static_cast<T>(shadow), weights));
  return keep ? shadow : updated;
}

// One element: shadow <- rule(shadow, weights), except where the non-finite policy keeps
// it; returns 1 when kept.
template <typename S, typename T, typename Rule>
BK_HD int update_shadow(S& shadow, T weights, bool skip_nonfinite, const Rule& rule) {
  const bool keep = keeps_old_shadow(weights, skip_nonfinite);
  shadow = kept_or_updated(shadow, weights, keep, rule);
  return keep;
}

// shadow <- rule(shadow, weights), except where the non-finite policy keeps it.
template <typename W, typename S, template <typename> class Rule>
struct ShadowUpdateOp {
  using T = opmath_t<W, S>;
  static constexpr int kVec = vector_width<W, S>();
  S* shadow;
  const W* weights;
  bool skip_nonfinite;
  Rule<T> rule;

  BK_HD ShadowUpdateOp resolved() const {
    ShadowUpdateOp op = *this;
    op.rule = rule.resolved();
    return op;
  }
  BK_HD bool hparams_valid() const { return rule.valid(); }
  BK_HD auto tensors() const { return std::tuple{shadow, weights}; }
  template <typename S2, typename W2>
  BK_HD ShadowUpdateOp<W2, S2, Rule> with_tensors(S2* shadow2, const W2* weights2) const {
    return {shadow2, weights2, skip_nonfinite, rule};
  }
  // Returns how many of the N * U elements kept their shadow under the non-finite policy.
  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    W w_in[N * U];
    S s_io[N * U];
    load_input_groups<N, U>(weights + i, w_in, stride);
    load_groups<N, U>(shadow + i, s_io, stride);
    int skipped = 0;
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) {
      skipped += update_shadow(s_io[k], static_cast<T>(w_in[k]), skip_nonfinite, rule);
    }
    store_groups<N, U>(shadow + i, s_io, stride);
    return skipped;
  }
};

template <typename W, typename S>
using EmaOp = ShadowUpdateOp<W, S, EmaRule>;
template <typename W, typename S>
using SwaOp = ShadowUpdateOp<W, S, SwaRule>;

// K EMAs of one weights tensor (post-hoc EMA's profiles), each as EmaOp would update it:
// the weights are loaded and upcast once, then each profile's shadow is loaded, updated
// and stored. A profile whose decay tensor is out of range is left as it was and counts
// every element skipped. The CPU loop runs a block of it all profiles per element
// (apply_all_valid) when every profile is valid, else as K EmaOps (profile()), the
// weights coming from memory once either way.
template <typename W, typename S, int K>
struct MultiEmaOp {
  static_assert(K >= 1 && K <= kMaxProfiles, "profiles per call");
  using T = opmath_t<W, S>;
  static constexpr int kVec = vector_width<W, S>();
  static constexpr int kProfiles = K;
  S* shadows[K];
  const W* weights;
  bool skip_nonfinite;
  EmaRule<T> rules[K];

  // Resolved, a profile keeps only its rate, NaN for an out-of-range decay (no valid decay
  // gives a NaN rate): K decays held beside K rates made the fp64 kernels spill at K = 8.
  BK_HD MultiEmaOp resolved() const {
    MultiEmaOp op = *this;
    BK_UNROLL
    for (int p = 0; p < K; ++p) {
      const EmaRule<T> rule = rules[p].resolved();
      op.rules[p] = {{0.0, nullptr}, rule.valid() ? rule.rate : std::numeric_limits<T>::quiet_NaN()};
    }
    return op;
  }
  BK_HD auto tensors() const { return tensors(std::make_integer_sequence<int, K>()); }
  template <int... P>
  BK_HD auto tensors(std::integer_sequence<int, P...>) const {
    return std::tuple{shadows[P]..., weights};
  }
  // Profile p alone, for a resolved op.
  BK_HD EmaOp<W, S> profile(int p) const { return {shadows[p], weights, skip_nonfinite, rules[p]}; }
  BK_HD bool profile_valid(int p) const { return rules[p].rate == rules[p].rate; }
  // The op on other storage (the float buffers of cpu_half_staging.h): K shadows, then the
  // weights, in tensors()'s order.
  template <typename... P>
  BK_HD auto with_tensors(P... pointers) const {
    static_assert(sizeof...(P) == K + 1, "K shadows and the weights");
    using Pointers = std::tuple<P...>;
    using S2 = std::remove_pointer_t<std::tuple_element_t<0, Pointers>>;
    using W2 = std::remove_const_t<std::remove_pointer_t<std::tuple_element_t<K, Pointers>>>;
    return with_tensor_tuple<W2, S2>(Pointers{pointers...}, std::make_index_sequence<K>());
  }
  template <typename W2, typename S2, typename Pointers, std::size_t... P>
  BK_HD MultiEmaOp<W2, S2, K> with_tensor_tuple(const Pointers& pointers,
                                                std::index_sequence<P...>) const {
    return {{std::get<P>(pointers)...}, std::get<K>(pointers), skip_nonfinite, {rules[P]...}};
  }
  // Elements [begin, end) of every profile, for a resolved op whose profiles are all valid
  // (its caller checks that once): no test per profile, so the loop over elements
  // vectorizes. Where every rate is under 0.5 (every decay over 0.5, as after an EMA's
  // first updates), each lerp is its one side, lerp_below_half: the same bits, less work.
  BK_HD int64_t apply_all_valid(int64_t begin, int64_t end) const {
    bool below_half = true;
    for (int p = 0; p < K; ++p) below_half = below_half && rules[p].rate < T(0.5);
    return below_half ? all_valid_loop<EmaBelowHalfRule>(begin, end)
                      : all_valid_loop<EmaRule>(begin, end);
  }
  // This loop beats K passes over each block (bench/multi_profile_loops.cpp times both).
  // The tensors are distinct (the ops' checks refuse overlapping ones), which the pragma
  // tells the vectorizer: it would otherwise version the loop on every pair of K + 1
  // pointers, and give up past ten pairs. An element kept in one profile is kept in all,
  // so it is counted once and the count multiplied by K: counted per profile, GCC turned
  // the K increments into one conditional add that its vectorizer does not take as a
  // reduction (below 0.5, K = 2).
  template <template <typename> class Rule>
  BK_HD int64_t all_valid_loop(int64_t begin, int64_t end) const {
    Rule<T> profile_rules[K];
    BK_UNROLL
    for (int p = 0; p < K; ++p) profile_rules[p] = {rules[p].decay, rules[p].rate};
    int32_t kept = 0;
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__)
#pragma GCC ivdep
#endif
    for (int64_t i = begin; i < end; ++i) {
      const T w = static_cast<T>(weights[i]);
      const bool keep = keeps_old_shadow(w, skip_nonfinite);
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__)
#pragma GCC unroll 8  // kMaxProfiles: left rolled at K = 8, the element loop did not vectorize
#endif
      for (int p = 0; p < K; ++p) {
        shadows[p][i] = kept_or_updated(shadows[p][i], w, keep, profile_rules[p]);
      }
      kept += keep;
    }
    return int64_t{K} * kept;
  }
  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    W w_in[N * U];
    load_input_groups<N, U>(weights + i, w_in, stride);
    T w[N * U];
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) w[k] = static_cast<T>(w_in[k]);
    int skipped = 0;
    BK_UNROLL
    for (int p = 0; p < K; ++p) {
      if (!profile_valid(p)) {
        skipped += N * U;
        continue;
      }
      S s_io[N * U];
      load_groups<N, U>(shadows[p] + i, s_io, stride);
      BK_UNROLL
      for (int k = 0; k < N * U; ++k) skipped += update_shadow(s_io[k], w[k], skip_nonfinite, rules[p]);
      store_groups<N, U>(shadows[p] + i, s_io, stride);
    }
    return skipped;
  }
};

template <typename Op>
constexpr bool has_profiles = requires { Op::kProfiles; };

template <typename W, typename S>
struct BelayOp {
  using T = opmath_t<W, S>;
  static constexpr int kVec = vector_width<W, S>();
  W* weights;
  S* shadow;
  ScalarArg<double> alpha_arg;
  ScalarArg<double> beta_arg;
  bool skip_nonfinite;
  T alpha;  // set by resolved()
  T beta;

  BK_HD BelayOp resolved() const {
    BelayOp op = *this;
    op.alpha = static_cast<T>(alpha_arg.get());
    op.beta = static_cast<T>(beta_arg.get());
    return op;
  }
  BK_HD bool hparams_valid() const { return is_rate(alpha_arg.get()) && is_rate(beta_arg.get()); }
  BK_HD auto tensors() const { return std::tuple{weights, shadow}; }
  template <typename W2, typename S2>
  BK_HD BelayOp<W2, S2> with_tensors(W2* weights2, S2* shadow2) const {
    return {weights2, shadow2, alpha_arg, beta_arg, skip_nonfinite, alpha, beta};
  }
  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    W w_io[N * U];
    S s_io[N * U];
    load_groups<N, U>(weights + i, w_io, stride);
    load_groups<N, U>(shadow + i, s_io, stride);
    int skipped = 0;
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) {
      const T w = static_cast<T>(w_io[k]);
      const T s = static_cast<T>(s_io[k]);
      const bool keep = keeps_old_shadow(w, skip_nonfinite);
      skipped += keep;
      w_io[k] = static_cast<W>(belay_weights(w, s, beta));
      const S updated = static_cast<S>(belay_shadow(s, w, alpha));
      s_io[k] = keep ? s_io[k] : updated;
    }
    store_groups<N, U>(weights + i, w_io, stride);
    store_groups<N, U>(shadow + i, s_io, stride);
    return skipped;
  }
};

// out has the weights' dtype; the snapshot may be wider (an fp32 copy of a bf16 model).
// out is only written, so the CPU loop streams it (kStreamsOutput).
template <typename W, typename S>
struct TwoPointOp {
  using T = opmath_t<W, S>;
  static constexpr int kVec = vector_width<W, S>();
  static constexpr bool kStreamsOutput = true;
  W* out;
  const W* weights;
  const S* snapshot;

  BK_HD TwoPointOp resolved() const { return *this; }
  BK_HD auto tensors() const { return std::tuple{out, weights, snapshot}; }
  template <typename W2, typename S2>
  BK_HD TwoPointOp<W2, S2> with_tensors(W2* out2, const W2* weights2, const S2* snapshot2) const {
    return {out2, weights2, snapshot2};
  }
  template <int N, int U = 1, typename OutStore = PlainStore>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    W w_in[N * U];
    S snap_in[N * U];
    W result[N * U];
    load_input_groups<N, U>(weights + i, w_in, stride);
    load_input_groups<N, U>(snapshot + i, snap_in, stride);
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) {
      result[k] =
          static_cast<W>(two_point(static_cast<T>(w_in[k]), static_cast<T>(snap_in[k])));
    }
    BK_UNROLL
    for (int u = 0; u < U; ++u) OutStore::template put<N>(out + i + u * stride, group<N>(result, u));
    return 0;
  }
};

// Same dtype: exchange the raw words (Bits is the unsigned integer of the element size).
template <typename Bits>
struct ExchangeOp {
  static constexpr int kVec = vector_width<Bits>();
  Bits* weights;
  Bits* shadow;

  BK_HD ExchangeOp resolved() const { return *this; }
  BK_HD auto tensors() const { return std::tuple{weights, shadow}; }
  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    Bits w[N * U];
    Bits s[N * U];
    load_groups<N, U>(weights + i, w, stride);
    load_groups<N, U>(shadow + i, s, stride);
    store_groups<N, U>(weights + i, s, stride);
    store_groups<N, U>(shadow + i, w, stride);
    return 0;
  }
};

// bf16 weights with an fp32 shadow: the exact bit packing of belay_math.h.
struct PackedSwapOp {
  static constexpr int kVec = vector_width<uint16_t, uint32_t>();
  uint16_t* weights;
  uint32_t* shadow;
  bool inverse;

  BK_HD PackedSwapOp resolved() const { return *this; }
  BK_HD auto tensors() const { return std::tuple{weights, shadow}; }
  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    uint16_t w[N * U];
    uint32_t s[N * U];
    load_groups<N, U>(weights + i, w, stride);
    load_groups<N, U>(shadow + i, s, stride);
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) swap_packed(w[k], s[k], inverse);
    store_groups<N, U>(weights + i, w, stride);
    store_groups<N, U>(shadow + i, s, stride);
    return 0;
  }
};

// --- an optimizer's step and the average in one pass (reference.adam_average_,
// sgd_average_) --------------------------------------------------------------------------
// One element: the parameter, its gradient, its optimizer state and its shadows are loaded
// once, the step runs in registers (belay_math.h's torch ops, rounded to the parameters'
// dtype P after each), then the averager's update of the new weights, and every tensor is
// stored once.

enum class AverageKind : int8_t { kNone, kEma, kSwa, kBelay, kPoster };

// The averager's update after the step, with the element math of the separate ops: EMA's
// K profiles (EmaOp's), SWA (SwaOp's), BELAY after the step (BelayOp's), or the poster's
// BELAY, whose shadow follows the weights from before the step. The kind is one value for
// the whole call, so on the device every thread takes the same branch.
template <typename S, typename T>
struct FusedAverage {
  AverageKind kind;
  int profiles;  // shadows in use: K for EMA, 1 for SWA and BELAY, 0 for none
  bool skip_nonfinite;
  // Unused entries hold shadows[0] (or the parameter's address when there is no shadow):
  // never read or written, they leave the alignment the loops derive unchanged.
  S* shadows[kMaxProfiles];
  // EMA: profile p's 1 - decay; SWA: [1 / (count + 1)]; BELAY: [alpha, beta]. Rounded to
  // opmath on the host, as the separate ops' resolved() rounds them.
  T rates[kMaxProfiles];

  // One shadow updated toward w by ``rule``, as ShadowUpdateOp::apply does it.
  template <int N, int U, typename Rule>
  BK_HD int update_profile(S* shadow, int64_t i, int64_t stride, const T (&w)[N * U],
                           const Rule& rule) const {
    S s_io[N * U];
    load_groups<N, U>(shadow + i, s_io, stride);
    int skipped = 0;
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) skipped += update_shadow(s_io[k], w[k], skip_nonfinite, rule);
    store_groups<N, U>(shadow + i, s_io, stride);
    return skipped;
  }

  // BELAY (BelayOp::apply's math): w <- lerp(w, s, beta); s <- lerp(s, x, alpha), where x
  // is the new weights, or for the poster's form the weights from before the step.
  template <int N, int U>
  BK_HD int spring(int64_t i, int64_t stride, T (&w)[N * U], const T (&before)[N * U]) const {
    S s_io[N * U];
    load_groups<N, U>(shadows[0] + i, s_io, stride);
    const bool poster = kind == AverageKind::kPoster;
    int skipped = 0;
    BK_UNROLL
    for (int k = 0; k < N * U; ++k) {
      const T s = static_cast<T>(s_io[k]);
      const T followed = poster ? before[k] : w[k];
      const bool keep = keeps_old_shadow(followed, skip_nonfinite);
      skipped += keep;
      w[k] = belay_weights(w[k], s, rates[1]);
      const S updated = static_cast<S>(belay_shadow(s, followed, rates[0]));
      s_io[k] = keep ? s_io[k] : updated;
    }
    store_groups<N, U>(shadows[0] + i, s_io, stride);
    return skipped;
  }

  // The update of N * U elements at i, i + stride, ...; w (the new weights) may change.
  template <int N, int U>
  BK_HD int apply(int64_t i, int64_t stride, T (&w)[N * U], const T (&before)[N * U]) const {
    switch (kind) {
      case AverageKind::kEma: {
        int skipped = 0;
        // Over every slot, unrolled on the device: indexed by constants, the shadows and
        // rates stay in registers; a loop to ``profiles`` put the whole op in local memory
        // (and its loads on generic addresses, not 128-bit global ones).
        BK_UNROLL
        for (int p = 0; p < kMaxProfiles; ++p) {
          if (p < profiles) {
            skipped += update_profile<N, U>(shadows[p], i, stride, w,
                                            EmaRule<T>{{0.0, nullptr}, rates[p]});
          }
        }
        return skipped;
      }
      case AverageKind::kSwa:
        return update_profile<N, U>(shadows[0], i, stride, w, SwaRule<T>{{0, nullptr}, rates[0]});
      case AverageKind::kBelay:
      case AverageKind::kPoster:
        return spring<N, U>(i, stride, w, before);
      default:
        return 0;
    }
  }
};

// GradScaler's part of a step: the gradients are first multiplied by ``unscale``
// (float32(1 / scale), GradScaler.unscale_'s factor) and written back, and a nonzero
// found_inf writes nothing at all. Read on the host for CPU tensors; for device tensors
// the kernel reads them (no host sync), in resolved().
struct AmpScalars {
  const float* grad_scale;  // device address, or nullptr
  const float* found_inf;   // device address, or nullptr
  bool unscales;
  bool found;     // set by resolved() (or on the host)
  float unscale;  // set by resolved() (or on the host)

  BK_HD AmpScalars resolved() const {
    AmpScalars amp = *this;
    if (grad_scale != nullptr) {
      amp.unscale = static_cast<float>(1.0 / static_cast<double>(*grad_scale));
      amp.grad_scale = nullptr;
    }
    if (found_inf != nullptr) {
      amp.found = *found_inf != 0.0f;
      amp.found_inf = nullptr;
    }
    return amp;
  }
};

// Adam's per-tensor step count, on the host (bias corrections computed there) or as the
// address of torch's float32 step tensor on the device, whose bias corrections each thread
// computes from step + 1 (the host increments the tensor after the kernel).
template <typename T>
struct AdamSteps {
  const float* step;  // device address, or nullptr
  double lr, beta1, beta2;
  T neg_step_size;          // -lr / bias_correction1, set on the host or by resolved()
  T bias_correction2_sqrt;  // likewise

  BK_HD AdamSteps resolved() const {
    AdamSteps steps = *this;
    if (step != nullptr) {
      const AdamBias bias = adam_bias(lr, beta1, beta2, static_cast<double>(*step + 1.0f));
      steps.neg_step_size = static_cast<T>(bias.neg_step_size);
      steps.bias_correction2_sqrt = static_cast<T>(bias.bias_correction2_sqrt);
      steps.step = nullptr;
    }
    return steps;
  }
};

// The tensors of a fused op: the step's, then kMaxProfiles shadow slots.
template <typename P, typename S, int... Q>
BK_HD auto fused_tensors(std::tuple<P*, P*, P*, P*, P*> own, S* const (&shadows)[kMaxProfiles],
                         std::integer_sequence<int, Q...>) {
  return std::tuple_cat(own, std::tuple{shadows[Q]...});
}

// The step's common front: the gradient unscaled (and written back) and negated for
// maximize, as torch.optim's ``grad = -grad`` after GradScaler.unscale_.
template <typename P, typename T>
BK_HD T incoming_grad(P& grad_io, const AmpScalars& amp, bool maximize) {
  T grad = static_cast<T>(grad_io);
  if (amp.unscales) {
    grad = scaled<P>(grad, static_cast<T>(amp.unscale));
    grad_io = static_cast<P>(grad);
  }
  return maximize ? -grad : grad;
}

// torch.optim.Adam (decoupled = false) or AdamW, single-tensor, then the average.
// P: parameters, gradients and optimizer state; S: shadows.
template <typename P, typename S>
struct AdamAverageOp {
  using T = opmath_t<P, S>;
  static constexpr int kVec = vector_width<P, S>();
  // The CPU loop runs it on its own storage (no fp16 staging in float buffers), since the
  // step rounds to the parameters' dtype after each op; one vector per thread at a time on
  // the device, where five tensors' vectors and the step's scalars share the registers.
  static constexpr bool kRoundsToStorage = true;
  static constexpr int kVectorsInFlight = 1;
  // cuda_kernels.cu: under 128 registers (2 blocks per SM) the list kernels of 16-bit and
  // fp64 parameters spilled, so the cap is 255; the kernels use what they need, and the
  // launch still fills the GPU with as many blocks as fit (resident_blocks).
  static constexpr int kMinBlocksPerSm = 1;
  P* param;
  P* grad;
  P* exp_avg;
  P* exp_avg_sq;
  P* max_exp_avg_sq;  // AMSGrad's maxima, or the parameter's address when off (untouched)
  FusedAverage<S, T> average;
  AmpScalars amp;
  AdamSteps<T> steps;
  T weight_decay;      // Adam: grad.add(param, alpha=weight_decay)
  T decay_factor;      // AdamW: param.mul_(1 - lr * weight_decay), taken in float64
  T one_minus_beta1;   // the scalars of torch's ops, each rounded to opmath from float64
  T beta2;
  T one_minus_beta2;
  T eps;
  bool decays;  // weight_decay != 0
  bool decoupled;
  bool maximize;
  bool amsgrad;

  BK_HD AdamAverageOp resolved() const {
    AdamAverageOp op = *this;
    op.amp = amp.resolved();
    op.steps = steps.resolved();
    return op;
  }
  BK_HD bool writes_anything() const { return !amp.found; }
  BK_HD auto tensors() const {
    return fused_tensors<P, S>({param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq},
                               average.shadows, std::make_integer_sequence<int, kMaxProfiles>());
  }

  // One element's step; returns the new weights (rounded to P) and updates the state.
  BK_HD T step(T p, T g, T& m, T& v, T& v_max) const {
    if (decays && decoupled) p = scaled<P>(p, decay_factor);
    if (decays && !decoupled) g = add_scaled<P>(g, p, weight_decay);
    m = lerped<P>(m, g, one_minus_beta1);
    v = add_squared<P>(scaled<P>(v, beta2), g, one_minus_beta2);
    if (amsgrad) v_max = maximum(v_max, v);
    const T denominator =
        adam_denominator<P>(amsgrad ? v_max : v, steps.bias_correction2_sqrt, eps);
    return add_quotient<P>(p, m, denominator, steps.neg_step_size);
  }

  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    constexpr int M = N * U;
    P p_io[M], g_io[M], m_io[M], v_io[M], v_max_io[M];
    load_groups<N, U>(param + i, p_io, stride);
    load_groups<N, U>(grad + i, g_io, stride);
    load_groups<N, U>(exp_avg + i, m_io, stride);
    load_groups<N, U>(exp_avg_sq + i, v_io, stride);
    if (amsgrad) load_groups<N, U>(max_exp_avg_sq + i, v_max_io, stride);
    T w[M], before[M];
    BK_UNROLL
    for (int k = 0; k < M; ++k) {
      before[k] = static_cast<T>(p_io[k]);
      const T g = incoming_grad<P, T>(g_io[k], amp, maximize);
      T m = static_cast<T>(m_io[k]);
      T v = static_cast<T>(v_io[k]);
      T v_max = amsgrad ? static_cast<T>(v_max_io[k]) : T(0);
      w[k] = step(before[k], g, m, v, v_max);
      m_io[k] = static_cast<P>(m);
      v_io[k] = static_cast<P>(v);
      if (amsgrad) v_max_io[k] = static_cast<P>(v_max);
    }
    const int skipped = average.template apply<N, U>(i, stride, w, before);
    BK_UNROLL
    for (int k = 0; k < M; ++k) p_io[k] = static_cast<P>(w[k]);
    store_groups<N, U>(param + i, p_io, stride);
    if (amp.unscales) store_groups<N, U>(grad + i, g_io, stride);
    store_groups<N, U>(exp_avg + i, m_io, stride);
    store_groups<N, U>(exp_avg_sq + i, v_io, stride);
    if (amsgrad) store_groups<N, U>(max_exp_avg_sq + i, v_max_io, stride);
    return skipped;
  }
};

// torch.optim.SGD, single-tensor, then the average.
template <typename P, typename S>
struct SgdAverageOp {
  using T = opmath_t<P, S>;
  static constexpr int kVec = vector_width<P, S>();
  static constexpr bool kRoundsToStorage = true;  // as AdamAverageOp
  static constexpr int kVectorsInFlight = 1;
  static constexpr int kMinBlocksPerSm = 1;  // as AdamAverageOp
  P* param;
  P* grad;
  P* momentum_buffer;  // or the parameter's address when momentum is 0 (untouched)
  FusedAverage<S, T> average;
  AmpScalars amp;
  T neg_lr;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  bool decays;       // weight_decay != 0
  bool has_momentum;  // momentum != 0
  bool nesterov;
  bool maximize;
  bool first_step;  // the buffers are new: they take the gradient

  BK_HD SgdAverageOp resolved() const {
    SgdAverageOp op = *this;
    op.amp = amp.resolved();
    return op;
  }
  BK_HD bool writes_anything() const { return !amp.found; }
  BK_HD auto tensors() const {
    return fused_tensors<P, S>({param, grad, momentum_buffer, momentum_buffer, momentum_buffer},
                               average.shadows, std::make_integer_sequence<int, kMaxProfiles>());
  }

  // One element's step; returns the new weights (rounded to P) and updates the buffer.
  BK_HD T step(T p, T g, T& buf) const {
    if (decays) g = add_scaled<P>(g, p, weight_decay);
    if (has_momentum) {
      buf = first_step ? g : add_scaled<P>(scaled<P>(buf, momentum), g, one_minus_dampening);
      g = nesterov ? add_scaled<P>(g, buf, momentum) : buf;
    }
    return add_scaled<P>(p, g, neg_lr);
  }

  template <int N, int U = 1>
  BK_HD int apply(int64_t i, int64_t stride = 0) const {
    constexpr int M = N * U;
    P p_io[M], g_io[M], b_io[M];
    load_groups<N, U>(param + i, p_io, stride);
    load_groups<N, U>(grad + i, g_io, stride);
    // a first step's buffers are only written
    const bool reads_buffer = has_momentum && !first_step;
    if (reads_buffer) load_groups<N, U>(momentum_buffer + i, b_io, stride);
    T w[M], before[M];
    BK_UNROLL
    for (int k = 0; k < M; ++k) {
      before[k] = static_cast<T>(p_io[k]);
      const T g = incoming_grad<P, T>(g_io[k], amp, maximize);
      T buf = reads_buffer ? static_cast<T>(b_io[k]) : T(0);
      w[k] = step(before[k], g, buf);
      if (has_momentum) b_io[k] = static_cast<P>(buf);
    }
    const int skipped = average.template apply<N, U>(i, stride, w, before);
    BK_UNROLL
    for (int k = 0; k < M; ++k) p_io[k] = static_cast<P>(w[k]);
    store_groups<N, U>(param + i, p_io, stride);
    if (amp.unscales) store_groups<N, U>(grad + i, g_io, stride);
    if (has_momentum) store_groups<N, U>(momentum_buffer + i, b_io, stride);
    return skipped;
  }
};

}  // namespace belay
