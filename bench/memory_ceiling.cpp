// What this machine's memory allows for each CPU op's access pattern, with no arithmetic.
//
// bench_extension.py rates every fused op against the best of torch's streaming kernels,
// which on the dev VM is the in-place scale: it reads a line and writes the same line
// back. An op that reads more streams than it writes moves its bytes in a different mix,
// and the memory system need not serve that mix as fast. Each kernel here moves exactly
// the bytes of one op (the same streams, the same element sizes, the same kind of store)
// but only XORs words instead of computing, so its rate is the most that op can reach.
// The rates are printed next to the in-place scale, timed in alternation with it.
//
//   g++ -O3 -mavx2 -fopenmp bench/memory_ceiling.cpp -o /tmp/memory_ceiling
//   OMP_NUM_THREADS=2 /tmp/memory_ceiling [elements (default 64Mi)] [rounds (default 11)]
//
// x86-64 with AVX2 only; not part of the package or its tests.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

using Bytes = unsigned char;

__m256i load(const void* at) { return _mm256_loadu_si256(static_cast<const __m256i*>(at)); }
void store(void* at, __m256i v) { _mm256_storeu_si256(static_cast<__m256i*>(at), v); }
void stream(void* at, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(at), v); }

// Every kernel walks its thread's share [begin, end) of the elements in steps of 8.
struct Buffers {
  float* a;
  float* b;
  float* c;
  std::uint16_t* half_a;
  std::uint16_t* half_c;
};

// torch's a.mul_(1.0): read a line, write it back. 8 B per fp32 element. (The factor is
// read from a volatile, or the compiler would drop a multiplication by one.) Also timed on
// the other two fp32 buffers: the same kernel on memory of its own shows how much the
// physical placement of a buffer alone moves the rate.
volatile float g_factor = 1.0f;
template <float* Buffers::*kBuffer>
void scale_in_place(const Buffers& m, std::int64_t begin, std::int64_t end) {
  float* a = m.*kBuffer;
  const __m256 one = _mm256_set1_ps(g_factor);
  for (std::int64_t i = begin; i < end; i += 8) {
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), one));
  }
}

// EMA / SWA, fp32: read weights, read and write the shadow in place. 12 B.
void ema_fp32(const Buffers& m, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; i += 8) {
    store(m.a + i, _mm256_xor_si256(load(m.a + i), load(m.b + i)));
  }
}

// Two-point average, fp32: read weights and snapshot, write a separate output. 12 B.
void two_point_fp32_stored(const Buffers& m, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; i += 8) {
    store(m.c + i, _mm256_xor_si256(load(m.a + i), load(m.b + i)));
  }
}

// The same with the output written by non-temporal stores, as the fused op does. 12 B.
void two_point_fp32_streamed(const Buffers& m, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; i += 8) {
    stream(m.c + i, _mm256_xor_si256(load(m.a + i), load(m.b + i)));
  }
  _mm_sfence();
}

// Two-point average, bf16 weights and output, fp32 snapshot, non-temporal output. 8 B.
void two_point_bf16_streamed(const Buffers& m, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; i += 16) {
    const __m256i snapshot = _mm256_xor_si256(load(m.b + i), load(m.b + i + 8));
    stream(m.half_c + i, _mm256_xor_si256(load(m.half_a + i), snapshot));
  }
  _mm_sfence();
}

// The same with ordinary stores. 8 B.
void two_point_bf16_stored(const Buffers& m, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; i += 16) {
    const __m256i snapshot = _mm256_xor_si256(load(m.b + i), load(m.b + i + 8));
    store(m.half_c + i, _mm256_xor_si256(load(m.half_a + i), snapshot));
  }
}

struct Kernel {
  std::string name;
  double bytes_per_element;
  void (*run)(const Buffers&, std::int64_t, std::int64_t);
};

double seconds(const Kernel& kernel, const Buffers& m, std::int64_t n) {
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel
  {
    const std::int64_t threads = omp_get_num_threads();
    const std::int64_t share = (n / threads + 15) / 16 * 16;
    const std::int64_t begin = std::min(n, omp_get_thread_num() * share);
    kernel.run(m, begin, std::min(n, begin + share));
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

template <typename T>
T* buffer(std::int64_t n) {
  auto* p = static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
  if (p == nullptr) {
    std::fprintf(stderr, "out of memory\n");
    std::exit(1);
  }
#pragma omp parallel for  // first touch by the threads that use the pages
  for (std::int64_t i = 0; i < n; ++i) p[i] = T(1);
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t n = (argc > 1 ? std::atoll(argv[1]) : std::int64_t{64} << 20) / 16 * 16;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 11;
  const Buffers m{buffer<float>(n), buffer<float>(n), buffer<float>(n),
                  buffer<std::uint16_t>(n), buffer<std::uint16_t>(n)};
  const std::vector<Kernel> kernels = {
      {"in-place scale fp32 (the stream reference)", 8, scale_in_place<&Buffers::a>},
      {"the same on a second buffer", 8, scale_in_place<&Buffers::b>},
      {"the same on a third buffer", 8, scale_in_place<&Buffers::c>},
      {"EMA/SWA fp32 pattern", 12, ema_fp32},
      {"two-point fp32 pattern, ordinary stores", 12, two_point_fp32_stored},
      {"two-point fp32 pattern, non-temporal", 12, two_point_fp32_streamed},
      {"two-point bf16 out/fp32 snapshot, non-temporal", 8, two_point_bf16_streamed},
      {"two-point bf16 out/fp32 snapshot, ordinary stores", 8, two_point_bf16_stored},
  };
  // Each round times every kernel once, so a noisy neighbour slows them alike.
  std::vector<std::vector<double>> times(kernels.size());
  for (int round = 0; round < rounds + 1; ++round) {
    for (std::size_t k = 0; k < kernels.size(); ++k) {
      const double t = seconds(kernels[k], m, n);
      if (round > 0) times[k].push_back(t);  // round 0 warms up
    }
  }
  std::printf("%d threads, %lld elements, median of %d rounds\n", omp_get_max_threads(),
              static_cast<long long>(n), rounds);
  const double reference = kernels[0].bytes_per_element * n / median(times[0]);
  for (std::size_t k = 0; k < kernels.size(); ++k) {
    const double rate = kernels[k].bytes_per_element * n / median(times[k]);
    std::printf("%-50s %6.1f GB/s %5.0f%%\n", kernels[k].name.c_str(), rate / 1e9,
                100 * rate / reference);
  }
  return 0;
}
