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

// One element: shadow <- rule(shadow, weights), except where the non-finite policy keeps
// it; returns 1 when kept.
template <typename S, typename T, typename Rule>
BK_HD int update_shadow(S& shadow, T weights, bool skip_nonfinite, const Rule& rule) {
  const bool keep = keeps_old_shadow(weights, skip_nonfinite);
  const S updated = static_cast<S>(rule(static_cast<T>(shadow), weights));
  shadow = keep ? shadow : updated;
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
// every element skipped. The CPU loop runs it block by block as K EmaOps (profile()), so
// the weights come from memory once and the compiler vectorizes each EmaOp as usual.
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

}  // namespace belay
