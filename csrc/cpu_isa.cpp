// The CPU loop's clones: which this CPU runs, and the choice among them (cpu_isa.h).
#include "cpu_isa.h"

#include <array>

namespace belay {

namespace {

constexpr std::array<const char*, 3> kNames = {"baseline", "avx2", "avx512"};

bool cpu_has(CpuIsa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return cpu_has(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == CpuIsa::kBaseline;  // other CPUs: the one loop, as the compiler builds it
#endif
}

}  // namespace

CpuIsa best_cpu_isa() {
  static const CpuIsa best = cpu_has(CpuIsa::kAvx512) ? CpuIsa::kAvx512
                             : cpu_has(CpuIsa::kAvx2) ? CpuIsa::kAvx2
                                                      : CpuIsa::kBaseline;
  return best;
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (int isa = 0; isa < static_cast<int>(kNames.size()); ++isa) {
    if (cpu_has(static_cast<CpuIsa>(isa))) names.emplace_back(kNames[isa]);
  }
  return names;
}

std::string set_cpu_isa(const std::string& name) {
  if (name.empty()) {
    cpu_isa_setting().store(-1);
    return "";
  }
  std::string choices;
  for (const std::string& supported : supported_cpu_isas()) {
    if (supported == name) {
      for (int isa = 0; isa < static_cast<int>(kNames.size()); ++isa) {
        if (name == kNames[isa]) cpu_isa_setting().store(isa);
      }
      return "";
    }
    choices += (choices.empty() ? "" : ", ") + supported;
  }
  return "BELAY_KERNELS_CPU_ISA=" + name + ": this CPU runs the clones " + choices +
         " (or leave it unset for the widest).";
}

std::string cpu_isa_name() { return kNames[static_cast<int>(chosen_cpu_isa())]; }

}  // namespace belay
