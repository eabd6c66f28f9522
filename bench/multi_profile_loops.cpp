// The K-profile EMA's loop shapes, alone, on fp32: where the time of one pass goes.
//
//   per-profile blocks   each profile in turn over a block of 256 elements (the weights then
//                        come from L1 for all but the first): the shape for a call with an
//                        out-of-range decay tensor;
//   all profiles, lerp   all K profiles per element, each by csrc/belay_math.h's two-sided lerp;
//   all profiles, <0.5   the same with every rate under 0.5, each lerp its one side
//                        (lerp_below_half): what multi_ema_update_ runs once the decays pass 0.5;
//   Inductor's shape     the loop torch.compile generates for the K-profile formula when
//                        nothing is counted: s + (w - s) r, kept where w is not finite.
//
// The first three keep non-finite weights out and count them per 256-element block, as our
// kernels do (an element kept in one profile is kept in all: all-profile loops count it
// once, times K); the last counts nothing. One thread; medians of interleaved runs.
//
//   g++ -O3 -march=native -mprefer-vector-width=512 -fno-trapping-math -fno-math-errno \
//       bench/multi_profile_loops.cpp -o /tmp/multi_profile_loops && /tmp/multi_profile_loops 4194304 4
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;

inline float lerp_below_half(float start, float end, float weight) {
  return std::fma(weight, end - start, start);
}

inline float lerp(float start, float end, float weight) {
  const float difference = end - start;
  const float from_start = lerp_below_half(start, end, weight);
  const float from_end = std::fma(-difference, 1.0f - weight, end);
  const float blended = weight < 0.5f ? from_start : from_end;
  return weight == 1.0f ? end : blended;
}

inline bool keeps(float w) { return !(w - w == 0.0f); }

template <bool kBelowHalf>
inline float kept_or_updated(float shadow, float w, bool keep, float rate) {
  const float updated = kBelowHalf ? lerp_below_half(shadow, w, rate) : lerp(shadow, w, rate);
  return keep ? shadow : updated;
}

template <int K>
__attribute__((noinline)) int64_t per_profile_blocks(float* const* s, const float* w,
                                                     const float* rate, int64_t n) {
  int64_t skipped = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    for (int p = 0; p < K; ++p) {
      float* sp = s[p];
      const float r = rate[p];
      int32_t kept = 0;
      for (int64_t i = b; i < e; ++i) {
        const bool keep = keeps(w[i]);
        sp[i] = kept_or_updated<false>(sp[i], w[i], keep, r);
        kept += keep;
      }
      skipped += kept;
    }
  }
  return skipped;
}

template <int K, bool kBelowHalf>
__attribute__((noinline)) int64_t all_profiles(float* const* s, const float* w,
                                               const float* rate, int64_t n) {
  float* sp[K];
  float r[K];
  for (int p = 0; p < K; ++p) sp[p] = s[p], r[p] = rate[p];
  int64_t skipped = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    int32_t kept = 0;
#pragma GCC ivdep
    for (int64_t i = b; i < e; ++i) {
      const float wi = w[i];
      const bool keep = keeps(wi);
#pragma GCC unroll 8
      for (int p = 0; p < K; ++p) sp[p][i] = kept_or_updated<kBelowHalf>(sp[p][i], wi, keep, r[p]);
      kept += keep;
    }
    skipped += int64_t{K} * kept;
  }
  return skipped;
}

template <int K>
__attribute__((noinline)) int64_t inductor_shape(float* const* s, const float* w,
                                                 const float* rate, int64_t n) {
  float* sp[K];
  float r[K];
  for (int p = 0; p < K; ++p) sp[p] = s[p], r[p] = rate[p];
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w[i];
    const bool keep = keeps(wi);
    for (int p = 0; p < K; ++p) {
      const float si = sp[p][i];
      sp[p][i] = keep ? si : si + (wi - si) * r[p];
    }
  }
  return 0;
}

template <int K>
void run(int64_t n, int repeats) {
  std::vector<std::vector<float>> shadows(K, std::vector<float>(n));
  std::vector<float> w(n);
  for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(i % 1000) * 1e-3f;
  for (int p = 0; p < K; ++p) std::fill(shadows[p].begin(), shadows[p].end(), 0.5f);
  float* s[K];
  float rate[K];
  for (int p = 0; p < K; ++p) s[p] = shadows[p].data(), rate[p] = 0.001f * (p + 1);
  using Loop = int64_t (*)(float* const*, const float*, const float*, int64_t);
  const Loop loops[] = {per_profile_blocks<K>, all_profiles<K, false>, all_profiles<K, true>,
                        inductor_shape<K>};
  const char* names[] = {"per-profile blocks", "all profiles, lerp", "all profiles, <0.5",
                         "Inductor's shape (uncounted)"};
  constexpr int kLoops = sizeof(loops) / sizeof(loops[0]);
  std::vector<double> ms[kLoops];
  int64_t sink = 0;
  for (int r = 0; r < repeats + 2; ++r) {
    for (int l = 0; l < kLoops; ++l) {
      const auto t0 = std::chrono::steady_clock::now();
      sink += loops[l](s, w.data(), rate, n);
      const auto t1 = std::chrono::steady_clock::now();
      if (r >= 2) ms[l].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  for (int l = 0; l < kLoops; ++l) {
    std::sort(ms[l].begin(), ms[l].end());
    std::printf("n=%lld K=%d  %-30s %8.3f ms\n", static_cast<long long>(n), K, names[l],
                ms[l][ms[l].size() / 2]);
  }
  std::printf("(medians of %d; %lld)\n", repeats, static_cast<long long>(sink));
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 4194304;
  const int k = argc > 2 ? std::atoi(argv[2]) : 4;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 21;
  if (k == 2) run<2>(n, repeats);
  else if (k == 4) run<4>(n, repeats);
  else if (k == 8) run<8>(n, repeats);
  else std::printf("K must be 2, 4 or 8\n");
  return 0;
}
