// Which clone of the CPU loop runs (cpu_loops.h): the extension is built for baseline x86-64,
// and the loop is compiled twice more, for AVX2 (+FMA, F16C) and for AVX-512 (F, BW, VL, DQ,
// with AVX2's), one of which cpu_chunk picks per call. By default the widest the CPU has;
// BELAY_KERNELS_CPU_ISA=avx512|avx2|baseline forces one (read when belay_kernels._C is
// imported), and the tests switch between them with _C._set_cpu_isa.
//
// Every clone gives the same bits: the math rounds once per operation whatever the vector
// width (belay_math.h), and each loop's reductions are integer counts.
#pragma once

#include <atomic>
#include <string>
#include <vector>

namespace belay {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The clone in use. Inline and outside any anonymous namespace, so that every kernel file
// reads the one setting.
inline std::atomic<int>& cpu_isa_setting() {
  static std::atomic<int> setting{-1};  // -1: not chosen yet
  return setting;
}

CpuIsa best_cpu_isa();
// The clones this CPU (and this build) can run, narrowest first, by name.
std::vector<std::string> supported_cpu_isas();
// Run the clone named ``name`` (one of supported_cpu_isas()); "" for the widest. Returns
// "", or for any other name a message naming the choices, with nothing changed.
std::string set_cpu_isa(const std::string& name);
std::string cpu_isa_name();

inline CpuIsa chosen_cpu_isa() {
  const int setting = cpu_isa_setting().load(std::memory_order_relaxed);
  return setting < 0 ? best_cpu_isa() : static_cast<CpuIsa>(setting);
}

}  // namespace belay
