// The K-profile EMA's loop shapes, alone: does running each profile over a block of 256
// elements in turn (the weights then come from L1 for all but the first) cost more than
// one loop that updates all K profiles per element? fp32, the lerp of csrc/belay_math.h,
// non-finite weights kept out and counted. One thread; medians of interleaved runs.
//
//   g++ -O3 -march=native -fno-trapping-math -fno-math-errno bench/multi_profile_loops.cpp \
//       -o /tmp/multi_profile_loops && /tmp/multi_profile_loops 4194304 4
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;

inline float lerp(float start, float end, float weight) {
  const float difference = end - start;
  const float from_start = std::fma(weight, difference, start);
  const float from_end = std::fma(-difference, 1.0f - weight, end);
  const float blended = weight < 0.5f ? from_start : from_end;
  return weight == 1.0f ? end : blended;
}

inline int update(float& shadow, float w, float rate) {
  const bool keep = !(w - w == 0.0f);
  const float updated = lerp(shadow, w, rate);
  shadow = keep ? shadow : updated;
  return keep;
}

template <int K>
int64_t per_profile_blocks(float* const* s, const float* w, const float* rate, int64_t n) {
  int64_t skipped = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    for (int p = 0; p < K; ++p) {
      float* sp = s[p];
      const float r = rate[p];
      int32_t kept = 0;
      for (int64_t i = b; i < e; ++i) kept += update(sp[i], w[i], r);
      skipped += kept;
    }
  }
  return skipped;
}

template <int K>
int64_t all_profiles_per_element(float* const* s, const float* w, const float* rate, int64_t n) {
  float* sp[K];
  float r[K];
  for (int p = 0; p < K; ++p) sp[p] = s[p], r[p] = rate[p];
  int64_t skipped = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    int32_t kept = 0;
    for (int64_t i = b; i < e; ++i) {
      const float wi = w[i];
      for (int p = 0; p < K; ++p) kept += update(sp[p][i], wi, r[p]);
    }
    skipped += kept;
  }
  return skipped;
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
  std::vector<double> a, b;
  int64_t sink = 0;
  for (int r = 0; r < repeats + 2; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    sink += per_profile_blocks<K>(s, w.data(), rate, n);
    auto t1 = std::chrono::steady_clock::now();
    sink += all_profiles_per_element<K>(s, w.data(), rate, n);
    auto t2 = std::chrono::steady_clock::now();
    if (r >= 2) {  // the first two warm the caches and the pages
      a.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      b.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    }
  }
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  std::printf("n=%lld K=%d: per-profile blocks %.3f ms, all profiles per element %.3f ms (medians of %d; %lld)\n",
              static_cast<long long>(n), K, a[a.size() / 2], b[b.size() / 2], repeats,
              static_cast<long long>(sink));
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
