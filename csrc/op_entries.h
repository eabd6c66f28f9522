// The ops' entry points, shared by the CPU and CUDA registrations (cpu_kernels*.cpp,
// cuda_kernels.cu): check every argument (before any memory is touched), pick the storage
// dtypes, build the element functor and hand it to an executor. An executor runs a functor
// over n elements:
//   exec.run(op, numel, skipped)            one flat call
//   exec.run_list(ops, numels, skipped)     a list of tensors, one launch where it can
// where ``skipped`` is the int64 counter's address or nullptr.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/List.h>
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

}  // namespace belay
