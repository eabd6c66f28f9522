// The ops' entry points, shared by the CPU and CUDA registrations (cpu_kernels*.cpp,
// cuda_kernels.cu): check every argument (before any memory is touched), pick the storage
// dtypes, build the element functor and hand it to an executor. An executor runs a functor
// over n elements:
//   exec.run(op, numel, skipped)            one flat call
//   exec.run_list(ops, numels, skipped)     a list of tensors, one launch where it can
// where ``skipped`` is the int64 counter's address or nullptr.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/eq.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>
#include <c10/util/StringUtil.h>

#include "element_ops.h"

namespace belay {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// --- the rows of a call ---------------------------------------------------------------
// A call's tensors as rows of one tensor per argument: one row for a flat op, one per list
// entry for a foreach op. They are views of the arguments (no Tensor is copied, so no
// reference count changes), and names for the error messages are built only when a check
// fails: a call of 1000 small tensors otherwise spent most of its host time on them.

// One tensor argument: its tensors (a flat op's one tensor is a list of one), its name as
// the messages spell it, and for the K-profile EMA's shadows its profile ("shadows[p]").
struct Column {
  at::TensorList tensors;
  const char* name;
  int64_t profile = -1;
};

class Rows;

// Row i of Rows: row[c] is argument c's tensor.
class Row {
 public:
  Row(const Rows& rows, size_t index) : rows_(rows), index_(index) {}
  const Tensor& operator[](size_t c) const;
  size_t size() const;
  size_t index() const { return index_; }

 private:
  const Rows& rows_;
  size_t index_;
};

class Rows {
 public:
  // ``foreach``: the names in messages carry the row index ("weights[3]").
  Rows(std::initializer_list<Column> columns, bool foreach)
      : columns_(columns), foreach_(foreach) {}
  Rows(c10::SmallVector<Column, kMaxProfiles + 1> columns, bool foreach)
      : columns_(std::move(columns)), foreach_(foreach) {}

  size_t size() const { return columns_[0].tensors.size(); }
  bool empty() const { return size() == 0; }
  Row operator[](size_t i) const { return Row(*this, i); }
  const Tensor& at(size_t i, size_t c) const { return columns_[c].tensors[i]; }
  size_t columns() const { return columns_.size(); }
  const Column& column(size_t c) const { return columns_[c]; }

  // Argument c's name ("weights"; "shadows[1]" for a profile), and its name in row i,
  // which a foreach op's messages index ("weights[3]").
  std::string name(size_t c) const {
    const Column& column = columns_[c];
    return column.profile < 0 ? std::string(column.name)
                              : c10::str(column.name, "[", column.profile, "]");
  }
  std::string name(size_t c, size_t i) const {
    return foreach_ ? c10::str(name(c), "[", i, "]") : name(c);
  }

 private:
  // Up to kMaxProfiles shadows and the weights without a heap allocation; more (a call the
  // K-profile EMA refuses later, with its own message) still fit.
  c10::SmallVector<Column, kMaxProfiles + 1> columns_;
  bool foreach_;
};

inline const Tensor& Row::operator[](size_t c) const { return rows_.at(index_, c); }
inline size_t Row::size() const { return rows_.columns(); }

// --- checks ------------------------------------------------------------------------------
// The names are c10::str arguments of TORCH_CHECK_VALUE, which evaluates them only when
// the check fails.

inline void check_row(const char* op, const Rows& rows, size_t i) {
  const Tensor& first = rows.at(i, 0);
  const size_t columns = rows.columns();
  for (size_t c = 0; c < columns; ++c) {
    const Tensor& t = rows.at(i, c);
    TORCH_CHECK_VALUE(t.defined(), op, ": ", rows.name(c, i), " is an undefined tensor.");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", rows.name(c, i), " has layout ",
                      t.layout(), "; the compiled kernels take dense tensors.");
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", rows.name(c, i), " is on ",
                      t.device(), " but ", rows.name(0, i), " is on ", first.device(),
                      "; move them to one device.");
    TORCH_CHECK_VALUE(t.numel() == first.numel(), op, ": ", rows.name(c, i), " has ",
                      t.numel(), " elements but ", rows.name(0, i), " has ", first.numel(),
                      "; they must match element for element.");
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", rows.name(c, i),
                      " is not contiguous; the compiled kernels need contiguous storage "
                      "(pass .contiguous(), or use backend='torch').");
  }
  for (size_t c = 0; c < columns; ++c) {
    for (size_t d = c + 1; d < columns; ++d) {
      const Tensor& first_tensor = rows.at(i, c);
      const Tensor& second_tensor = rows.at(i, d);
      const auto* a = static_cast<const char*>(first_tensor.data_ptr());
      const auto* b = static_cast<const char*>(second_tensor.data_ptr());
      const bool overlap = first_tensor.numel() > 0 && second_tensor.numel() > 0 &&
                           a < b + second_tensor.nbytes() && b < a + first_tensor.nbytes();
      TORCH_CHECK_VALUE(!overlap, op, ": ", rows.name(c, i), " and ", rows.name(d, i),
                        " share memory; the update would read what it already wrote. "
                        "Give each its own storage (e.g. .clone()).");
    }
  }
}

// A flat op's one row, checked.
inline Rows checked_row(const char* op, std::initializer_list<Column> columns) {
  Rows rows(columns, /*foreach=*/false);
  check_row(op, rows, 0);
  return rows;
}

// Equal-length tensor lists, each row checked; one device and one dtype combination for
// the whole list (the Python ops group rows that way).
inline Rows checked_lists(const char* op, Rows rows) {
  for (size_t c = 1; c < rows.columns(); ++c) {
    TORCH_CHECK_VALUE(rows.column(c).tensors.size() == rows.column(0).tensors.size(), op,
                      ": ", rows.name(c), " has ", rows.column(c).tensors.size(),
                      " tensors but ", rows.name(0), " has ", rows.column(0).tensors.size(),
                      ".");
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    check_row(op, rows, i);
    if (i == 0) continue;
    for (size_t c = 0; c < rows.columns(); ++c) {
      const Tensor& t = rows.at(i, c);
      const Tensor& first = rows.at(0, c);
      TORCH_CHECK_VALUE(t.device() == first.device() && t.scalar_type() == first.scalar_type(),
                        op, ": ", rows.name(c, i), " is ", t.scalar_type(), " on ",
                        t.device(), " but ", rows.name(c, 0), " is ", first.scalar_type(),
                        " on ", first.device(),
                        "; one call takes one device and one dtype per list.");
    }
  }
  return rows;
}
inline Rows checked_lists(const char* op, std::initializer_list<Column> columns) {
  return checked_lists(op, Rows(columns, /*foreach=*/true));
}

inline int64_t* skipped_address(const char* op, const OptionalTensor& skipped,
                                 const at::Device& device) {
  if (!skipped.has_value()) return nullptr;
  const Tensor& t = *skipped;
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.numel() == 1 && t.device() == device,
                    op, ": skipped must be a one-element int64 tensor on ", device, ", got a ",
                    t.scalar_type(), " tensor of ", t.numel(), " elements on ", t.device(),
                    ".");
  return t.mutable_data_ptr<int64_t>();
}

// A rate in [0, 1], as a number or as a one-element float64 tensor.
inline ScalarArg<double> rate_arg(const char* op, const char* name, double value,
                                  const OptionalTensor& tensor, const at::Device& device) {
  if (!tensor.has_value()) {
    TORCH_CHECK_VALUE(value >= 0.0 && value <= 1.0, op, ": ", name,
                      " must be in [0, 1], got ", value, ".");
    return {value, nullptr};
  }
  const Tensor& t = *tensor;
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kDouble, op, ": ", name,
                    "_tensor must be a one-element float64 tensor, got ", t.scalar_type(),
                    " with ", t.numel(), " elements.");
  if (t.device() == device) return {0.0, t.const_data_ptr<double>()};
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": ", name, "_tensor is on ", t.device(),
                    " but the tensors are on ", device, ".");
  return {t.item<double>(), nullptr};
}

inline ScalarArg<int64_t> count_arg(const char* op, int64_t value, const OptionalTensor& tensor,
                                    const at::Device& device) {
  if (!tensor.has_value()) {
    TORCH_CHECK_VALUE(value >= 0, op, ": count must be >= 0, got ", value, ".");
    return {value, nullptr};
  }
  const Tensor& t = *tensor;
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kLong, op,
                    ": count_tensor must be a one-element int64 tensor, got ",
                    t.scalar_type(), " with ", t.numel(), " elements.");
  if (t.device() == device) return {0, t.const_data_ptr<int64_t>()};
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": count_tensor is on ", t.device(),
                    " but the tensors are on ", device, ".");
  return {t.item<int64_t>(), nullptr};
}

// --- dtype dispatch ----------------------------------------------------------------------
// Calls f(W{}, S{}) with the storage types of (weights, shadow): one dtype, or bf16/fp16
// weights with an fp32 shadow.
template <typename F>
void dispatch_pair(const char* op, at::ScalarType weights, at::ScalarType shadow, F&& f) {
  using at::ScalarType;
  if (weights == shadow) {
    switch (weights) {
      case ScalarType::Float: return f(float{}, float{});
      case ScalarType::Double: return f(double{}, double{});
      case ScalarType::BFloat16: return f(c10::BFloat16{}, c10::BFloat16{});
      case ScalarType::Half: return f(c10::Half{}, c10::Half{});
      default: break;
    }
  } else if (shadow == ScalarType::Float) {
    if (weights == ScalarType::BFloat16) return f(c10::BFloat16{}, float{});
    if (weights == ScalarType::Half) return f(c10::Half{}, float{});
  }
  TORCH_CHECK_VALUE(false, op, ": no compiled kernel for ", weights, " weights with a ",
                    shadow, " shadow; supported: float32, float64, bfloat16 or float16 with "
                    "the same dtype, or bfloat16/float16 weights with a float32 shadow. "
                    "Use backend='torch' for other combinations.");
}

template <typename T>
T* address(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Runs make_op(row) for one tensor row or a whole list.
template <typename Exec, typename MakeOp>
void run_rows(const Exec& exec, const Rows& rows, int64_t* skipped, MakeOp&& make_op) {
  // One guard for the whole list (its rows share a device).
  typename Exec::DeviceGuard guard(rows.at(0, 0).device());
  if (rows.size() == 1) {
    exec.run(make_op(rows[0]), rows.at(0, 0).numel(), skipped);
    return;
  }
  using Op = decltype(make_op(rows[0]));
  std::vector<Op> ops;
  std::vector<int64_t> numels;
  ops.reserve(rows.size());
  numels.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    ops.push_back(make_op(rows[i]));
    numels.push_back(rows.at(i, 0).numel());
  }
  exec.run_list(ops, numels, skipped);
}

// --- the ops -----------------------------------------------------------------------------
// Each op is a struct whose rows() takes the checked rows (one for the flat op, one per
// tensor for the foreach op; a tensor per argument, in schema order) and the scalars. The
// registered entry points that call it are written out below the structs.

struct EmaUpdate {
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, double decay,
                   const OptionalTensor& decay_tensor, bool skip_nonfinite,
                   const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::ema_update_";
    if (rows.empty()) return;
    const at::Device device = rows[0][0].device();
    const auto decay_arg = rate_arg(op, "decay", decay, decay_tensor, device);
    int64_t* skipped_at = skipped_address(op, skipped, device);
    dispatch_pair(op, rows[0][1].scalar_type(), rows[0][0].scalar_type(), [&](auto w, auto s) {
      using W = decltype(w);
      using S = decltype(s);
      run_rows(exec, rows, skipped_at, [&](const Row& row) {
        return EmaOp<W, S>{address<S>(row[0]), address<const W>(row[1]), skip_nonfinite,
                           {decay_arg, 0}};
      });
    });
  }
};

struct SwaUpdate {
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, int64_t count,
                   const OptionalTensor& count_tensor, bool skip_nonfinite,
                   const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::swa_update_";
    if (rows.empty()) return;
    const at::Device device = rows[0][0].device();
    const auto models = count_arg(op, count, count_tensor, device);
    int64_t* skipped_at = skipped_address(op, skipped, device);
    dispatch_pair(op, rows[0][1].scalar_type(), rows[0][0].scalar_type(), [&](auto w, auto s) {
      using W = decltype(w);
      using S = decltype(s);
      run_rows(exec, rows, skipped_at, [&](const Row& row) {
        return SwaOp<W, S>{address<S>(row[0]), address<const W>(row[1]), skip_nonfinite,
                           {models, 0}};
      });
    });
  }
};

struct BelayStep {
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, double alpha, double beta,
                   const OptionalTensor& alpha_tensor, const OptionalTensor& beta_tensor,
                   bool skip_nonfinite, const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::belay_step_";
    if (rows.empty()) return;
    const at::Device device = rows[0][0].device();
    const auto alpha_arg = rate_arg(op, "alpha", alpha, alpha_tensor, device);
    const auto beta_arg = rate_arg(op, "beta", beta, beta_tensor, device);
    int64_t* skipped_at = skipped_address(op, skipped, device);
    dispatch_pair(op, rows[0][0].scalar_type(), rows[0][1].scalar_type(), [&](auto w, auto s) {
      using W = decltype(w);
      using S = decltype(s);
      run_rows(exec, rows, skipped_at, [&](const Row& row) {
        return BelayOp<W, S>{address<W>(row[0]), address<S>(row[1]), alpha_arg, beta_arg,
                             skip_nonfinite, 0, 0};
      });
    });
  }
};

struct TwoPointAverage {
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows) {
    constexpr const char* op = "belay_kernels::two_point_average_";
    if (rows.empty()) return;
    TORCH_CHECK_VALUE(rows[0][0].scalar_type() == rows[0][1].scalar_type(), op, ": out is ",
                      rows[0][0].scalar_type(), " but weights are ", rows[0][1].scalar_type(),
                      "; the compiled kernel writes the weights' dtype. Use backend='torch' "
                      "for other combinations.");
    dispatch_pair(op, rows[0][1].scalar_type(), rows[0][2].scalar_type(), [&](auto w, auto s) {
      using W = decltype(w);
      using S = decltype(s);
      run_rows(exec, rows, nullptr, [&](const Row& row) {
        return TwoPointOp<W, S>{address<W>(row[0]), address<const W>(row[1]),
                                address<const S>(row[2])};
      });
    });
  }
};

struct Swap {
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, bool inverse) {
    constexpr const char* op = "belay_kernels::swap_";
    if (rows.empty()) return;
    const auto weights = rows[0][0].scalar_type();
    const auto shadow = rows[0][1].scalar_type();
    if (weights == at::kBFloat16 && shadow == at::kFloat) {
      run_rows(exec, rows, nullptr, [&](const Row& row) {
        return PackedSwapOp{address<uint16_t>(row[0]), address<uint32_t>(row[1]), inverse};
      });
      return;
    }
    // The dtypes of dispatch_pair: 1-byte floats (Float8) would fall into no word size.
    const bool exchangeable = weights == shadow &&
                              (weights == at::kFloat || weights == at::kDouble ||
                               weights == at::kBFloat16 || weights == at::kHalf);
    TORCH_CHECK_VALUE(exchangeable, op, ": no exact in-place swap for ", weights,
                      " weights with a ", shadow, " shadow; supported: float32, float64, "
                      "bfloat16 or float16 with the same dtype, or bfloat16 weights with a "
                      "float32 shadow. Use backend='torch' for other dtypes.");
    auto exchange = [&](auto bits) {
      using Bits = decltype(bits);
      run_rows(exec, rows, nullptr, [&](const Row& row) {
        return ExchangeOp<Bits>{address<Bits>(row[0]), address<Bits>(row[1])};
      });
    };
    switch (rows[0][0].element_size()) {
      case 2: return exchange(uint16_t{});
      case 4: return exchange(uint32_t{});
      case 8: return exchange(uint64_t{});
      default: TORCH_CHECK_VALUE(false, op, ": no word size for ", weights, ".");
    }
  }
};

// Calls f(std::integral_constant<int, K>{}) for the profile count k, 1 <= k <= kMaxProfiles.
template <int K = 1, typename F>
void dispatch_profiles(const char* op, int64_t k, F&& f) {
  if constexpr (K <= kMaxProfiles) {
    if (k == K) return f(std::integral_constant<int, K>{});
    return dispatch_profiles<K + 1>(op, k, f);
  } else {
    TORCH_CHECK_VALUE(false, op, ": got ", k, " shadows; the compiled kernels take 1 to ",
                      kMaxProfiles, " per call. Split the profiles over several calls, or "
                      "use backend='torch'.");
  }
}

// K shadows of one weights tensor: a row has K shadows (one per profile), then the
// weights. decay_tensors is empty or has one entry per decay.
struct MultiEmaUpdate {
  // Rows of (shadows[0], ..., shadows[K-1], weights); K = decays.size().
  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, at::ArrayRef<double> decays,
                   const c10::List<std::optional<Tensor>>& decay_tensors, bool skip_nonfinite,
                   const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::multi_ema_update_";
    const int64_t k = static_cast<int64_t>(decays.size());
    TORCH_CHECK_VALUE(k >= 1 && k <= kMaxProfiles, op, ": got ", k, " decays; the compiled "
                      "kernels take 1 to ", kMaxProfiles, " profiles per call. Split the "
                      "profiles over several calls, or use backend='torch'.");
    TORCH_CHECK_VALUE(decay_tensors.empty() || static_cast<int64_t>(decay_tensors.size()) == k,
                      op, ": decay_tensors has ", decay_tensors.size(), " entries but decays has ",
                      k, "; pass one (a tensor or None) per decay, or none.");
    if (rows.empty()) return;
    TORCH_CHECK_VALUE(static_cast<int64_t>(rows[0].size()) == k + 1, op, ": got ",
                      rows[0].size() - 1, " shadows but ", k, " decays; pass one decay per shadow.");
    const at::Device device = rows[0][0].device();
    for (int64_t p = 1; p < k; ++p) {
      TORCH_CHECK_VALUE(rows[0][p].scalar_type() == rows[0][0].scalar_type(), op, ": shadows[",
                        p, "] is ", rows[0][p].scalar_type(), " but shadows[0] is ",
                        rows[0][0].scalar_type(), "; the compiled kernels take one shadow dtype "
                        "(use backend='torch' to mix them).");
    }
    std::vector<ScalarArg<double>> rates;
    for (int64_t p = 0; p < k; ++p) {
      const std::string name = "decays[" + std::to_string(p) + "]";
      const OptionalTensor tensor =
          decay_tensors.empty() ? OptionalTensor() : OptionalTensor(decay_tensors.get(p));
      rates.push_back(rate_arg(op, name.c_str(), decays[p], tensor, device));
    }
    int64_t* skipped_at = skipped_address(op, skipped, device);
    dispatch_pair(op, rows[0][k].scalar_type(), rows[0][0].scalar_type(), [&](auto w, auto s) {
      using W = decltype(w);
      using S = decltype(s);
      dispatch_profiles(op, k, [&](auto profiles) {
        constexpr int K = decltype(profiles)::value;
        run_rows(exec, rows, skipped_at, [&](const Row& row) {
          MultiEmaOp<W, S, K> multi{};
          for (int p = 0; p < K; ++p) {
            multi.shadows[p] = address<S>(row[p]);
            multi.rules[p] = {rates[p], 0};
          }
          multi.weights = address<const W>(row[K]);
          multi.skip_nonfinite = skip_nonfinite;
          return multi;
        });
      });
    });
  }
};

// --- an optimizer's step and the average in one pass ----------------------------------------
// adam_average_ and sgd_average_ (reference.adam_average_, sgd_average_). Every argument is
// checked before anything is written, the state steps included; a refused call changes
// nothing.

// The average a call names, checked against its numbers and its shadows.
struct AverageSpec {
  AverageKind kind;
  int64_t profiles;  // shadows per tensor the update uses
};

inline AverageSpec checked_average(const char* op, c10::string_view name,
                                   at::ArrayRef<double> scalars, size_t shadows, size_t n) {
  const size_t count = scalars.size();
  auto rates_in_range = [&](const char* what) {
    for (size_t j = 0; j < count; ++j) {
      TORCH_CHECK_VALUE(scalars[j] >= 0.0 && scalars[j] <= 1.0, op, ": average '", name,
                        "' takes ", what, " in [0, 1], got average_scalars[", j, "] = ",
                        scalars[j], ".");
    }
  };
  AverageSpec spec{AverageKind::kNone, 0};
  if (name == "none") {
    TORCH_CHECK_VALUE(count == 0, op, ": average 'none' takes no average_scalars, got ",
                      count, ".");
    return spec;  // the shadows, if any, are not touched
  } else if (name == "ema") {
    TORCH_CHECK_VALUE(count >= 1 && count <= static_cast<size_t>(kMaxProfiles), op,
                      ": average 'ema' takes 1 to ", kMaxProfiles,
                      " decays (one per profile), got ", count, ".");
    rates_in_range("decays");
    spec = {AverageKind::kEma, static_cast<int64_t>(count)};
  } else if (name == "swa") {
    TORCH_CHECK_VALUE(count == 1 && scalars[0] >= 0.0 && scalars[0] == std::floor(scalars[0]),
                      op, ": average 'swa' takes [count], a whole number >= 0; got ", scalars,
                      ".");
    spec = {AverageKind::kSwa, 1};
  } else if (name == "belay" || name == "poster") {
    TORCH_CHECK_VALUE(count == 2, op, ": average '", name, "' takes [alpha, beta], got ",
                      count, " numbers.");
    rates_in_range("alpha and beta");
    spec = {name == "belay" ? AverageKind::kBelay : AverageKind::kPoster, 1};
  } else {
    TORCH_CHECK_VALUE(false, op, ": unknown average '", name,
                      "'; expected 'none', 'ema', 'swa', 'belay' or 'poster'.");
  }
  TORCH_CHECK_VALUE(shadows == static_cast<size_t>(spec.profiles) * n, op, ": average '", name,
                    "' with ", spec.profiles, " profile(s) of ", n, " tensors needs ",
                    spec.profiles * n, " shadows (profile after profile), got ", shadows, ".");
  return spec;
}

// The averager's part of a row's functor; shadows start at column ``first_shadow``.
template <typename S, typename T, typename P>
FusedAverage<S, T> fused_average(const AverageSpec& spec, at::ArrayRef<double> scalars,
                                 bool skip_nonfinite, const Row& row, size_t first_shadow) {
  FusedAverage<S, T> average{};
  average.kind = spec.kind;
  average.profiles = static_cast<int>(spec.profiles);
  average.skip_nonfinite = skip_nonfinite;
  for (int p = 0; p < kMaxProfiles; ++p) {
    average.shadows[p] = spec.profiles == 0 ? reinterpret_cast<S*>(address<P>(row[0]))
                         : p < spec.profiles ? address<S>(row[first_shadow + p])
                                             : address<S>(row[first_shadow]);
  }
  switch (spec.kind) {
    case AverageKind::kEma:  // EmaRule::resolved's rate
      for (int p = 0; p < spec.profiles; ++p) average.rates[p] = static_cast<T>(1.0 - scalars[p]);
      break;
    case AverageKind::kSwa:
      average.rates[0] = swa_weight<T>(static_cast<int64_t>(scalars[0]));
      break;
    case AverageKind::kBelay:
    case AverageKind::kPoster:  // BelayOp::resolved's alpha and beta
      average.rates[0] = static_cast<T>(scalars[0]);
      average.rates[1] = static_cast<T>(scalars[1]);
      break;
    default:
      break;
  }
  return average;
}

// A GradScaler tensor: one float32 element on the parameters' device or on the CPU.
inline void check_amp_tensor(const char* op, const char* name, const OptionalTensor& t,
                             const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->defined() && t->numel() == 1 && t->scalar_type() == at::kFloat &&
                        (t->device() == device || t->is_cpu()),
                    op, ": ", name, " must be a one-element float32 tensor on ", device,
                    " or the CPU (GradScaler's), got ",
                    t->defined() ? c10::str(t->scalar_type(), " with ", t->numel(),
                                            " elements on ", t->device())
                                 : std::string("an undefined tensor"),
                    ".");
}

// GradScaler's tensors as the kernels take them: values read on the host when on the CPU,
// device addresses otherwise. ``found`` (a nonzero found_inf read on the host) means the
// call writes nothing.
inline AmpScalars amp_scalars(const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  AmpScalars amp{nullptr, nullptr, grad_scale.has_value(), false, 1.0f};
  if (grad_scale.has_value()) {
    if (grad_scale->is_cpu()) {
      amp.unscale = static_cast<float>(1.0 / static_cast<double>(grad_scale->item<float>()));
    } else {
      amp.grad_scale = grad_scale->const_data_ptr<float>();
    }
  }
  if (found_inf.has_value()) {
    if (found_inf->is_cpu()) {
      amp.found = found_inf->item<float>() != 0.0f;
    } else {
      amp.found_inf = found_inf->const_data_ptr<float>();
    }
  }
  return amp;
}

// The columns of a fused call: the step's lists, then each profile's n shadows.
inline Rows fused_rows(const char* op, std::initializer_list<Column> step_columns,
                       at::TensorList shadows, int64_t profiles, size_t n) {
  c10::SmallVector<Column, kMaxProfiles + 1> columns(step_columns.begin(), step_columns.end());
  for (int64_t p = 0; p < profiles; ++p) {
    columns.push_back({shadows.slice(p * n, n), "shadows", p});
  }
  return checked_lists(op, Rows(std::move(columns), /*foreach=*/true));
}

// The step's lists share the parameters' dtype, and the profiles one shadow dtype.
inline void check_fused_dtypes(const char* op, const Rows& rows, size_t step_columns) {
  if (rows.empty()) return;
  const Row first = rows[0];
  for (size_t c = 1; c < rows.columns(); ++c) {
    const size_t like = c < step_columns ? 0 : step_columns;
    TORCH_CHECK_VALUE(first[c].scalar_type() == first[like].scalar_type(), op, ": ",
                      rows.name(c), " are ", first[c].scalar_type(), " but ", rows.name(like),
                      " are ", first[like].scalar_type(), "; ",
                      c < step_columns ? "the optimizer's state takes the parameters' dtype."
                                       : "the profiles take one shadow dtype.");
  }
}

// torch's per-parameter step counts: one-element float32 tensors, all on the CPU (read and
// incremented on the host) or all on the parameters' device (read by the kernel). True for
// the device.
inline bool checked_state_steps(const char* op, at::TensorList steps, size_t n,
                                const at::Device& device) {
  TORCH_CHECK_VALUE(steps.size() == n, op, ": state_steps has ", steps.size(),
                    " tensors but params has ", n, ".");
  if (n == 0) return false;
  const bool on_device = steps[0].defined() && !steps[0].is_cpu();
  for (size_t i = 0; i < n; ++i) {
    const Tensor& t = steps[i];
    TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && t.scalar_type() == at::kFloat &&
                          (on_device ? t.device() == device : t.is_cpu()),
                      op, ": state_steps[", i, "] must be a one-element float32 tensor, all ",
                      "of them on the CPU or all on ", device, " (torch's step counts).");
  }
  return on_device;
}

// After a kernel that read device step counts: each + 1, unless GradScaler found an inf
// (read on the device too, so no host sync).
inline void increment_device_steps(at::TensorList steps, const AmpScalars& amp,
                                   const OptionalTensor& found_inf) {
  if (amp.found) return;
  if (amp.found_inf != nullptr) {
    at::_foreach_add_(steps, found_inf->reshape({}).eq(0).to(at::kFloat));
  } else {
    at::_foreach_add_(steps, at::Scalar(1.0));
  }
}

struct AdamAverage {
  template <typename Exec>
  static void call(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList state_steps, at::TensorList shadows,
                   const OptionalTensor& grad_scale, const OptionalTensor& found_inf, double lr,
                   double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                   bool maximize, c10::string_view average, at::ArrayRef<double> average_scalars,
                   bool skip_nonfinite, const OptionalTensor& skipped) {
    constexpr const char* op = "adam_average_";
    const size_t n = params.size();
    const bool amsgrad = !max_exp_avg_sqs.empty();
    const AverageSpec spec = checked_average(op, average, average_scalars, shadows.size(), n);
    TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0, op,
                      ": betas must be in [0, 1), got (", beta1, ", ", beta2, ").");
    const Rows rows =
        amsgrad ? fused_rows(op,
                             {{params, "params"}, {grads, "grads"}, {exp_avgs, "exp_avgs"},
                              {exp_avg_sqs, "exp_avg_sqs"}, {max_exp_avg_sqs, "max_exp_avg_sqs"}},
                             shadows, spec.profiles, n)
                : fused_rows(op,
                             {{params, "params"}, {grads, "grads"}, {exp_avgs, "exp_avgs"},
                              {exp_avg_sqs, "exp_avg_sqs"}},
                             shadows, spec.profiles, n);
    const size_t step_columns = amsgrad ? 5 : 4;
    check_fused_dtypes(op, rows, step_columns);
    if (rows.empty()) {
      TORCH_CHECK_VALUE(state_steps.empty(), op, ": state_steps has ", state_steps.size(),
                        " tensors but params has 0.");
      return;
    }
    const at::Device device = rows[0][0].device();
    const bool device_steps = checked_state_steps(op, state_steps, n, device);
    check_amp_tensor(op, "grad_scale", grad_scale, device);
    check_amp_tensor(op, "found_inf", found_inf, device);
    int64_t* skipped_at = skipped_address(op, skipped, device);
    const auto param_dtype = rows[0][0].scalar_type();
    const auto shadow_dtype =
        spec.profiles > 0 ? rows[0][step_columns].scalar_type() : param_dtype;
    dispatch_pair(op, param_dtype, shadow_dtype, [&](auto p_type, auto s_type) {
      using P = decltype(p_type);
      using S = decltype(s_type);
      using T = opmath_t<P, S>;
      // Checked; from here on memory is written.
      const AmpScalars amp = amp_scalars(grad_scale, found_inf);
      if (amp.found) return;  // GradScaler found an inf: nothing changes, steps included
      std::vector<AdamBias> bias(n);
      if (!device_steps) {
        for (size_t i = 0; i < n; ++i) {
          float* step = state_steps[i].mutable_data_ptr<float>();
          *step += 1.0f;  // step_t += 1, in float32
          bias[i] = adam_bias(lr, beta1, beta2, static_cast<double>(*step));
        }
      }
      run_rows(Exec{}, rows, skipped_at, [&](const Row& row) {
        AdamAverageOp<P, S> adam{};
        adam.param = address<P>(row[0]);
        adam.grad = address<P>(row[1]);
        adam.exp_avg = address<P>(row[2]);
        adam.exp_avg_sq = address<P>(row[3]);
        adam.max_exp_avg_sq = amsgrad ? address<P>(row[4]) : adam.param;
        adam.average = fused_average<S, T, P>(spec, average_scalars, skip_nonfinite, row,
                                              step_columns);
        adam.amp = amp;
        const size_t i = row.index();
        adam.steps = {device_steps ? state_steps[i].const_data_ptr<float>() : nullptr,
                      lr,
                      beta1,
                      beta2,
                      static_cast<T>(bias[i].neg_step_size),
                      static_cast<T>(bias[i].bias_correction2_sqrt)};
        adam.weight_decay = static_cast<T>(weight_decay);
        adam.decay_factor = static_cast<T>(1.0 - lr * weight_decay);
        adam.one_minus_beta1 = static_cast<T>(1.0 - beta1);
        adam.beta2 = static_cast<T>(beta2);
        adam.one_minus_beta2 = static_cast<T>(1.0 - beta2);
        adam.eps = static_cast<T>(eps);
        adam.decays = weight_decay != 0.0;
        adam.decoupled = decoupled;
        adam.maximize = maximize;
        adam.amsgrad = amsgrad;
        return adam;
      });
      if (device_steps) increment_device_steps(state_steps, amp, found_inf);
    });
  }
};

struct SgdAverage {
  template <typename Exec>
  static void call(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList shadows, const OptionalTensor& grad_scale,
                   const OptionalTensor& found_inf, double lr, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool first_step, c10::string_view average,
                   at::ArrayRef<double> average_scalars, bool skip_nonfinite,
                   const OptionalTensor& skipped) {
    constexpr const char* op = "sgd_average_";
    const size_t n = params.size();
    const bool has_momentum = momentum != 0.0;
    TORCH_CHECK_VALUE(has_momentum ? momentum_buffers.size() == n : momentum_buffers.empty(),
                      op, ": momentum_buffers has ", momentum_buffers.size(), " tensors; with",
                      has_momentum ? " momentum " : " momentum 0 ", "it takes ",
                      has_momentum ? n : 0, ".");
    TORCH_CHECK_VALUE(!nesterov || has_momentum, op, ": nesterov needs a momentum.");
    const AverageSpec spec = checked_average(op, average, average_scalars, shadows.size(), n);
    const Rows rows =
        has_momentum
            ? fused_rows(op,
                         {{params, "params"}, {grads, "grads"},
                          {momentum_buffers, "momentum_buffers"}},
                         shadows, spec.profiles, n)
            : fused_rows(op, {{params, "params"}, {grads, "grads"}}, shadows, spec.profiles, n);
    const size_t step_columns = has_momentum ? 3 : 2;
    check_fused_dtypes(op, rows, step_columns);
    if (rows.empty()) return;
    const at::Device device = rows[0][0].device();
    check_amp_tensor(op, "grad_scale", grad_scale, device);
    check_amp_tensor(op, "found_inf", found_inf, device);
    int64_t* skipped_at = skipped_address(op, skipped, device);
    const auto param_dtype = rows[0][0].scalar_type();
    const auto shadow_dtype =
        spec.profiles > 0 ? rows[0][step_columns].scalar_type() : param_dtype;
    dispatch_pair(op, param_dtype, shadow_dtype, [&](auto p_type, auto s_type) {
      using P = decltype(p_type);
      using S = decltype(s_type);
      using T = opmath_t<P, S>;
      // Checked; from here on memory is written.
      const AmpScalars amp = amp_scalars(grad_scale, found_inf);
      if (amp.found) return;  // GradScaler found an inf: nothing changes
      run_rows(Exec{}, rows, skipped_at, [&](const Row& row) {
        SgdAverageOp<P, S> sgd{};
        sgd.param = address<P>(row[0]);
        sgd.grad = address<P>(row[1]);
        sgd.momentum_buffer = has_momentum ? address<P>(row[2]) : sgd.param;
        sgd.average =
            fused_average<S, T, P>(spec, average_scalars, skip_nonfinite, row, step_columns);
        sgd.amp = amp;
        sgd.neg_lr = static_cast<T>(-lr);
        sgd.weight_decay = static_cast<T>(weight_decay);
        sgd.momentum = static_cast<T>(momentum);
        sgd.one_minus_dampening = static_cast<T>(1.0 - dampening);
        sgd.decays = weight_decay != 0.0;
        sgd.has_momentum = has_momentum;
        sgd.nesterov = nesterov;
        sgd.maximize = maximize;
        sgd.first_step = first_step;
        return sgd;
      });
    });
  }
};

// --- the registered entry points -----------------------------------------------------------
// One function per op, with the signature of its schema (registration.cpp), templated only
// on the executor: CpuExec and SimulatedGridExec (cpu_loops.h), CudaExec (cuda_kernels.cu).
// Each checks the tensors, then hands the rows to its op's rows(). A check failing here
// names the op without its namespace, as the messages always have.

template <typename Exec>
void ema_update(const Tensor& shadow, const Tensor& weights, double decay,
                const OptionalTensor& decay_tensor, bool skip_nonfinite,
                const OptionalTensor& skipped) {
  EmaUpdate::rows(Exec{}, checked_row("ema_update_", {{shadow, "shadow"}, {weights, "weights"}}),
                  decay, decay_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void ema_update_foreach(at::TensorList shadows, at::TensorList weights, double decay,
                        const OptionalTensor& decay_tensor, bool skip_nonfinite,
                        const OptionalTensor& skipped) {
  EmaUpdate::rows(Exec{},
                  checked_lists("ema_update_foreach_",
                                {{shadows, "shadows"}, {weights, "weights"}}),
                  decay, decay_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void swa_update(const Tensor& shadow, const Tensor& weights, int64_t count,
                const OptionalTensor& count_tensor, bool skip_nonfinite,
                const OptionalTensor& skipped) {
  SwaUpdate::rows(Exec{}, checked_row("swa_update_", {{shadow, "shadow"}, {weights, "weights"}}),
                  count, count_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void swa_update_foreach(at::TensorList shadows, at::TensorList weights, int64_t count,
                        const OptionalTensor& count_tensor, bool skip_nonfinite,
                        const OptionalTensor& skipped) {
  SwaUpdate::rows(Exec{},
                  checked_lists("swa_update_foreach_",
                                {{shadows, "shadows"}, {weights, "weights"}}),
                  count, count_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void belay_step(const Tensor& weights, const Tensor& shadow, double alpha, double beta,
                const OptionalTensor& alpha_tensor, const OptionalTensor& beta_tensor,
                bool skip_nonfinite, const OptionalTensor& skipped) {
  BelayStep::rows(Exec{}, checked_row("belay_step_", {{weights, "weights"}, {shadow, "shadow"}}),
                  alpha, beta, alpha_tensor, beta_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void belay_step_foreach(at::TensorList weights, at::TensorList shadows, double alpha,
                        double beta, const OptionalTensor& alpha_tensor,
                        const OptionalTensor& beta_tensor, bool skip_nonfinite,
                        const OptionalTensor& skipped) {
  BelayStep::rows(Exec{},
                  checked_lists("belay_step_foreach_",
                                {{weights, "weights"}, {shadows, "shadows"}}),
                  alpha, beta, alpha_tensor, beta_tensor, skip_nonfinite, skipped);
}

template <typename Exec>
void two_point_average(const Tensor& out, const Tensor& weights, const Tensor& snapshot) {
  TwoPointAverage::rows(
      Exec{}, checked_row("two_point_average_",
                          {{out, "out"}, {weights, "weights"}, {snapshot, "snapshot"}}));
}

template <typename Exec>
void two_point_average_foreach(at::TensorList outs, at::TensorList weights,
                               at::TensorList snapshots) {
  TwoPointAverage::rows(
      Exec{}, checked_lists("two_point_average_foreach_",
                            {{outs, "outs"}, {weights, "weights"}, {snapshots, "snapshots"}}));
}

template <typename Exec>
void swap(const Tensor& weights, const Tensor& shadow, bool inverse) {
  Swap::rows(Exec{}, checked_row("swap_", {{weights, "weights"}, {shadow, "shadow"}}), inverse);
}

template <typename Exec>
void swap_foreach(at::TensorList weights, at::TensorList shadows, bool inverse) {
  Swap::rows(Exec{}, checked_lists("swap_foreach_", {{weights, "weights"}, {shadows, "shadows"}}),
             inverse);
}

// The K-profile EMA's checks name the op with its namespace, as its messages always have.
template <typename Exec>
void multi_ema_update(at::TensorList shadows, const Tensor& weights, at::ArrayRef<double> decays,
                      const c10::List<std::optional<Tensor>>& decay_tensors,
                      bool skip_nonfinite, const OptionalTensor& skipped) {
  constexpr const char* op = "belay_kernels::multi_ema_update_";
  TORCH_CHECK_VALUE(shadows.size() == decays.size(), op, ": got ", shadows.size(),
                    " shadows but ", decays.size(), " decays; pass one decay per shadow.");
  c10::SmallVector<Column, kMaxProfiles + 1> columns;
  for (size_t p = 0; p < shadows.size(); ++p) {
    columns.push_back({shadows[p], "shadows", static_cast<int64_t>(p)});
  }
  columns.push_back({weights, "weights"});
  Rows rows(std::move(columns), /*foreach=*/false);
  check_row(op, rows, 0);
  MultiEmaUpdate::rows(Exec{}, rows, decays, decay_tensors, skip_nonfinite, skipped);
}

// The list op takes the K profiles' shadow lists one after the other (shadows[p * N + i]
// for weights[i]).
template <typename Exec>
void multi_ema_update_foreach(at::TensorList shadows, at::TensorList weights,
                              at::ArrayRef<double> decays,
                              const c10::List<std::optional<Tensor>>& decay_tensors,
                              bool skip_nonfinite, const OptionalTensor& skipped) {
  constexpr const char* op = "belay_kernels::multi_ema_update_foreach_";
  const size_t k = decays.size();
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(shadows.size() == k * n, op, ": got ", shadows.size(), " shadows for ",
                    k, " decays and ", n, " weights; pass each profile's ", n,
                    " shadows, profile after profile.");
  c10::SmallVector<Column, kMaxProfiles + 1> columns;
  for (size_t p = 0; p < k; ++p) {
    columns.push_back({shadows.slice(p * n, n), "shadows", static_cast<int64_t>(p)});
  }
  columns.push_back({weights, "weights"});
  MultiEmaUpdate::rows(Exec{}, checked_lists(op, Rows(std::move(columns), /*foreach=*/true)),
                       decays, decay_tensors, skip_nonfinite, skipped);
}

template <typename Exec>
void adam_average(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList state_steps, at::TensorList shadows,
                  const OptionalTensor& grad_scale, const OptionalTensor& found_inf, double lr,
                  double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                  bool maximize, c10::string_view average, at::ArrayRef<double> average_scalars,
                  bool skip_nonfinite, const OptionalTensor& skipped) {
  AdamAverage::call<Exec>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                          shadows, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay,
                          decoupled, maximize, average, average_scalars, skip_nonfinite, skipped);
}

template <typename Exec>
void sgd_average(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::TensorList shadows, const OptionalTensor& grad_scale,
                 const OptionalTensor& found_inf, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, bool first_step,
                 c10::string_view average, at::ArrayRef<double> average_scalars,
                 bool skip_nonfinite, const OptionalTensor& skipped) {
  SgdAverage::call<Exec>(params, grads, momentum_buffers, shadows, grad_scale, found_inf, lr,
                         momentum, dampening, weight_decay, nesterov, maximize, first_step,
                         average, average_scalars, skip_nonfinite, skipped);
}

}  // namespace belay
