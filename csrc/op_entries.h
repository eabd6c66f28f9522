// The ops' entry points, shared by the CPU and CUDA registrations: check every argument
// (before any memory is touched), pick the storage dtypes, build the element functor and
// hand it to an executor. An executor runs a functor over n elements:
//   exec.run(op, numel, skipped)            one flat call
//   exec.run_list(ops, numels, skipped)     a list of tensors, one launch where it can
// where ``skipped`` is the int64 counter's address or nullptr.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "element_ops.h"

namespace belay {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// --- checks ------------------------------------------------------------------------------

inline void check_row(const char* op, const std::vector<std::string>& names,
                      const std::vector<Tensor>& tensors) {
  const Tensor& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    const std::string& name = names[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor.");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, " has layout ", t.layout(),
                      "; the compiled kernels take dense tensors.");
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, " is on ", t.device(),
                      " but ", names[0], " is on ", first.device(),
                      "; move them to one device.");
    TORCH_CHECK_VALUE(t.numel() == first.numel(), op, ": ", name, " has ", t.numel(),
                      " elements but ", names[0], " has ", first.numel(),
                      "; they must match element for element.");
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                      " is not contiguous; the compiled kernels need contiguous storage "
                      "(pass .contiguous(), or use backend='torch').");
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (size_t j = i + 1; j < tensors.size(); ++j) {
      const auto* a = static_cast<const char*>(tensors[i].data_ptr());
      const auto* b = static_cast<const char*>(tensors[j].data_ptr());
      const bool overlap = tensors[i].numel() > 0 && tensors[j].numel() > 0 &&
                           a < b + tensors[j].nbytes() && b < a + tensors[i].nbytes();
      TORCH_CHECK_VALUE(!overlap, op, ": ", names[i], " and ", names[j],
                        " share memory; the update would read what it already wrote. "
                        "Give each its own storage (e.g. .clone()).");
    }
  }
}

inline std::vector<std::string> indexed(const std::vector<std::string>& names, size_t i) {
  std::vector<std::string> out;
  for (const auto& n : names) out.push_back(n + "[" + std::to_string(i) + "]");
  return out;
}

// Columns of equal-length tensor lists -> rows, each checked; one device and one dtype
// combination for the whole list (the Python ops group rows that way).
inline std::vector<std::vector<Tensor>> check_lists(
    const char* op, const std::vector<std::string>& names,
    const std::vector<std::vector<Tensor>>& columns) {
  for (size_t c = 1; c < columns.size(); ++c) {
    TORCH_CHECK_VALUE(columns[c].size() == columns[0].size(), op, ": ", names[c], " has ",
                      columns[c].size(), " tensors but ", names[0], " has ",
                      columns[0].size(), ".");
  }
  std::vector<std::vector<Tensor>> rows;
  for (size_t i = 0; i < columns[0].size(); ++i) {
    std::vector<Tensor> row;
    for (const auto& column : columns) row.push_back(column[i]);
    check_row(op, indexed(names, i), row);
    if (!rows.empty()) {
      for (size_t c = 0; c < row.size(); ++c) {
        TORCH_CHECK_VALUE(row[c].device() == rows[0][c].device() &&
                              row[c].scalar_type() == rows[0][c].scalar_type(),
                          op, ": ", names[c], "[", i, "] is ", row[c].scalar_type(), " on ",
                          row[c].device(), " but ", names[c], "[0] is ",
                          rows[0][c].scalar_type(), " on ", rows[0][c].device(),
                          "; one call takes one device and one dtype per list.");
      }
    }
    rows.push_back(std::move(row));
  }
  return rows;
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
void run_rows(const Exec& exec, const std::vector<std::vector<Tensor>>& rows,
              int64_t* skipped, MakeOp&& make_op) {
  typename Exec::DeviceGuard guard(rows[0][0].device());
  if (rows.size() == 1) {
    exec.run(make_op(rows[0]), rows[0][0].numel(), skipped);
    return;
  }
  using Op = decltype(make_op(rows[0]));
  std::vector<Op> ops;
  std::vector<int64_t> numels;
  for (const auto& row : rows) {
    ops.push_back(make_op(row));
    numels.push_back(row[0].numel());
  }
  exec.run_list(ops, numels, skipped);
}

// --- the ops -----------------------------------------------------------------------------
// Each op is a struct: its names (as belay_kernels/methods.py spells them), its tensor
// roles in argument order, the schema text of its scalars, and rows(), which takes the
// checked rows (one for the flat op, one per tensor for the foreach op) and the scalars.
// Entry<> below turns that into the two registered functions, and BELAY_OPS lists them.

using Rows = std::vector<std::vector<Tensor>>;

// A tensor role: its name in the flat op, its name in the foreach op, and whether the op
// writes it (which gives the schema its alias annotation).
struct Role {
  const char* name;
  const char* list_name;
  bool written;
};

struct EmaUpdate {
  static constexpr const char* kName = "ema_update_";
  static constexpr const char* kForeach = "ema_update_foreach_";
  static constexpr std::array<Role, 2> kRoles{{{"shadow", "shadows", true},
                                               {"weights", "weights", false}}};
  static constexpr const char* kScalars = "float decay, Tensor? decay_tensor, bool skip_nonfinite";
  static constexpr bool kCountsSkipped = true;

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
      run_rows(exec, rows, skipped_at, [&](const std::vector<Tensor>& row) {
        return EmaOp<W, S>{address<S>(row[0]), address<const W>(row[1]), skip_nonfinite,
                           {decay_arg, 0}};
      });
    });
  }
};

struct SwaUpdate {
  static constexpr const char* kName = "swa_update_";
  static constexpr const char* kForeach = "swa_update_foreach_";
  static constexpr std::array<Role, 2> kRoles{{{"shadow", "shadows", true},
                                               {"weights", "weights", false}}};
  static constexpr const char* kScalars = "int count, Tensor? count_tensor, bool skip_nonfinite";
  static constexpr bool kCountsSkipped = true;

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
      run_rows(exec, rows, skipped_at, [&](const std::vector<Tensor>& row) {
        return SwaOp<W, S>{address<S>(row[0]), address<const W>(row[1]), skip_nonfinite,
                           {models, 0}};
      });
    });
  }
};

struct BelayStep {
  static constexpr const char* kName = "belay_step_";
  static constexpr const char* kForeach = "belay_step_foreach_";
  static constexpr std::array<Role, 2> kRoles{{{"weights", "weights", true},
                                               {"shadow", "shadows", true}}};
  static constexpr const char* kScalars =
      "float alpha, float beta, Tensor? alpha_tensor, Tensor? beta_tensor, bool skip_nonfinite";
  static constexpr bool kCountsSkipped = true;

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
      run_rows(exec, rows, skipped_at, [&](const std::vector<Tensor>& row) {
        return BelayOp<W, S>{address<W>(row[0]), address<S>(row[1]), alpha_arg, beta_arg,
                             skip_nonfinite, 0, 0};
      });
    });
  }
};

struct TwoPointAverage {
  static constexpr const char* kName = "two_point_average_";
  static constexpr const char* kForeach = "two_point_average_foreach_";
  static constexpr std::array<Role, 3> kRoles{{{"out", "outs", true},
                                               {"weights", "weights", false},
                                               {"snapshot", "snapshots", false}}};
  static constexpr const char* kScalars = "";
  static constexpr bool kCountsSkipped = false;

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
      run_rows(exec, rows, nullptr, [&](const std::vector<Tensor>& row) {
        return TwoPointOp<W, S>{address<W>(row[0]), address<const W>(row[1]),
                                address<const S>(row[2])};
      });
    });
  }
};

struct Swap {
  static constexpr const char* kName = "swap_";
  static constexpr const char* kForeach = "swap_foreach_";
  static constexpr std::array<Role, 2> kRoles{{{"weights", "weights", true},
                                               {"shadow", "shadows", true}}};
  static constexpr const char* kScalars = "bool inverse";
  static constexpr bool kCountsSkipped = false;

  template <typename Exec>
  static void rows(const Exec& exec, const Rows& rows, bool inverse) {
    constexpr const char* op = "belay_kernels::swap_";
    if (rows.empty()) return;
    const auto weights = rows[0][0].scalar_type();
    const auto shadow = rows[0][1].scalar_type();
    if (weights == at::kBFloat16 && shadow == at::kFloat) {
      run_rows(exec, rows, nullptr, [&](const std::vector<Tensor>& row) {
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
      run_rows(exec, rows, nullptr, [&](const std::vector<Tensor>& row) {
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

// K shadows of one weights tensor. Its shadows role is a list of K tensors per row, so it
// spells its own schemas and entry points (flat and foreach) instead of Entry's.
struct MultiEmaUpdate {
  static constexpr const char* kName = "multi_ema_update_";
  static constexpr const char* kForeach = "multi_ema_update_foreach_";
  static constexpr bool kOwnEntries = true;
  // decay_tensors is empty or has one entry per decay; the list op takes the K profiles'
  // shadow lists one after the other (shadows[p * N + i] for weights[i]).
  static constexpr const char* kArgs =
      "float[] decays, Tensor?[] decay_tensors, bool skip_nonfinite, Tensor(b!)? skipped) -> ()";
  static std::string schema(bool list) {
    return std::string(list ? kForeach : kName) +
           (list ? "(Tensor(a!)[] shadows, Tensor[] weights, " : "(Tensor(a!)[] shadows, Tensor weights, ") +
           kArgs;
  }

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
        run_rows(exec, rows, skipped_at, [&](const std::vector<Tensor>& row) {
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

  template <typename Exec>
  static void flat(at::TensorList shadows, const Tensor& weights, at::ArrayRef<double> decays,
                   const c10::List<std::optional<Tensor>>& decay_tensors, bool skip_nonfinite,
                   const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::multi_ema_update_";
    TORCH_CHECK_VALUE(shadows.size() == decays.size(), op, ": got ", shadows.size(),
                      " shadows but ", decays.size(), " decays; pass one decay per shadow.");
    std::vector<std::string> names;
    for (size_t p = 0; p < shadows.size(); ++p) names.push_back("shadows[" + std::to_string(p) + "]");
    names.push_back("weights");
    std::vector<Tensor> row = shadows.vec();
    row.push_back(weights);
    check_row(op, names, row);
    rows(Exec{}, Rows{std::move(row)}, decays, decay_tensors, skip_nonfinite, skipped);
  }

  template <typename Exec>
  static void foreach(at::TensorList shadows, at::TensorList weights, at::ArrayRef<double> decays,
                      const c10::List<std::optional<Tensor>>& decay_tensors,
                      bool skip_nonfinite, const OptionalTensor& skipped) {
    constexpr const char* op = "belay_kernels::multi_ema_update_foreach_";
    const size_t k = decays.size();
    const size_t n = weights.size();
    TORCH_CHECK_VALUE(shadows.size() == k * n, op, ": got ", shadows.size(), " shadows for ",
                      k, " decays and ", n, " weights; pass each profile's ", n,
                      " shadows, profile after profile.");
    std::vector<std::string> names;
    std::vector<std::vector<Tensor>> columns;
    for (size_t p = 0; p < k; ++p) {
      names.push_back("shadows[" + std::to_string(p) + "]");
      columns.emplace_back(shadows.begin() + p * n, shadows.begin() + (p + 1) * n);
    }
    names.push_back("weights");
    columns.push_back(weights.vec());
    rows(Exec{}, check_lists(op, names, columns), decays, decay_tensors, skip_nonfinite, skipped);
  }
};

// --- the registered functions -------------------------------------------------------------

// The schema of an op whose roles are one tensor each: written roles get the alias sets
// a, b, ... in order, and the skipped counter the next one.
template <typename Op>
std::string table_schema(bool list) {
  std::vector<std::string> args;
  char alias = 'a';
  for (const Role& role : Op::kRoles) {
    const std::string type = role.written ? std::string("Tensor(") + alias++ + "!)" : "Tensor";
    args.push_back(list ? type + "[] " + role.list_name : type + " " + role.name);
  }
  if (*Op::kScalars != '\0') args.emplace_back(Op::kScalars);
  if (Op::kCountsSkipped) args.push_back(std::string("Tensor(") + alias + "!)? skipped");
  std::string text = std::string(list ? Op::kForeach : Op::kName) + "(";
  for (size_t i = 0; i < args.size(); ++i) text += (i ? ", " : "") + args[i];
  return text + ") -> ()";
}

// An op that spells its own schemas and entry points (schema(), flat(), foreach()).
template <typename Op>
constexpr bool has_own_entries = requires { Op::kOwnEntries; };

template <typename Op>
std::string schema(bool list) {
  if constexpr (has_own_entries<Op>) {
    return Op::schema(list);
  } else {
    return table_schema<Op>(list);
  }
}

template <std::size_t, typename T>
using Repeat = T;

// The flat and foreach functions of a table-shaped op, with the signature its schema
// declares: one tensor (or one list) per role, then rows()'s scalars.
template <typename Exec, typename Op, typename RowsFn, typename Indices>
struct Entry;
template <typename Exec, typename Op, typename... Scalars, std::size_t... I>
struct Entry<Exec, Op, void (*)(const Exec&, const Rows&, Scalars...), std::index_sequence<I...>> {
  static void flat(Repeat<I, const Tensor&>... tensors, Scalars... scalars) {
    check_row(Op::kName, {Op::kRoles[I].name...}, {tensors...});
    Op::rows(Exec{}, Rows{{tensors...}}, scalars...);
  }
  static void foreach(Repeat<I, at::TensorList>... lists, Scalars... scalars) {
    Op::rows(Exec{}, check_lists(Op::kForeach, {Op::kRoles[I].list_name...}, {lists.vec()...}),
             scalars...);
  }
};

template <typename Exec, typename Op>
void register_impls(torch::Library& m) {
  if constexpr (has_own_entries<Op>) {
    m.impl(Op::kName, &Op::template flat<Exec>);
    m.impl(Op::kForeach, &Op::template foreach<Exec>);
  } else {
    using E = Entry<Exec, Op, decltype(&Op::template rows<Exec>),
                    std::make_index_sequence<Op::kRoles.size()>>;
    m.impl(Op::kName, &E::flat);
    m.impl(Op::kForeach, &E::foreach);
  }
}

// Registers the kernels of Ops for one executor (one dispatch key of one library).
template <typename Exec, typename... Ops>
void register_all(torch::Library& m) {
  (register_impls<Exec, Ops>(m), ...);
}

}  // namespace belay

// Every op, once: the schemas (registration.cpp) and the CUDA registrations
// (cuda_kernels.cu) are generated from this list, and each CPU kernel file registers the
// ops it instantiates (BELAY_CPU_KERNELS in cpu_loops.h).
#define BELAY_OPS(X) \
  X(EmaUpdate)       \
  X(MultiEmaUpdate)  \
  X(SwaUpdate)       \
  X(BelayStep)       \
  X(TwoPointAverage) \
  X(Swap)
