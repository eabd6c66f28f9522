#pragma once
// CPU implementations: at::parallel_for over the flat buffer, each chunk a loop over
// element_ops.h's functors that the compiler vectorizes, in blocks that may prefetch the
// next one. An op whose output is only written (the two-point average) computes each block
// into a small buffer and stores it past the cache. On x86 the loop is compiled twice more,
// for AVX2 and for AVX-512, and one clone is picked at run time (cpu_isa.h), since the
// extension is built for the baseline ISA; in both, 16-bit float storage is converted in
// bulk (cpu_half_staging.h).
//
// This file also holds the simulated CUDA grid: with _simulate_cuda_grid(blocks, threads,
// chunk) set, the CPU ops run grid_body.h (the CUDA kernels' bodies) for every (block,
// thread) of that grid instead, so the tests check the GPU code paths on a CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#define BK_STREAMING_STORES 1
#endif

#include "cpu_half_staging.h"
#include "cpu_fused_blocks.h"
#include "cpu_isa.h"
#include "grid_body.h"
#include "op_entries.h"

namespace belay {

// The shape of the simulated CUDA grid that the tests' belay_kernels_grid ops run on; 0
// blocks = none set. Outside the anonymous namespace and inline, so that every kernel file
// reads the one grid that set_simulated_grid() sets.
struct SimulatedGrid {
  int64_t blocks = 0;
  int64_t threads = 0;
  int64_t chunk = 0;
};
inline SimulatedGrid& simulated_grid() {
  static thread_local SimulatedGrid grid;
  return grid;
}

namespace {

struct NoDeviceGuard {
  explicit NoDeviceGuard(const at::Device&) {}
};

// The loops below are always inlined (BK_HD), so that each clone (cpu_loop_avx2,
// cpu_loop_avx512) compiles them for its instructions.
//
// The CPU loop walks its range in blocks of this many elements. Before a block it
// prefetches the next block's cache lines (except where ``prefetches`` below says not): on
// the AVX2 machines this was tuned on, a vectorized loop alone kept too few loads in flight
// to stream from memory at full speed, the more so the more instructions it spent per
// element. Skipped elements are counted in 32 bits per block, which vectorizes far
// better than a 64-bit count per element.
constexpr int64_t kBlock = 256;

// Prefetch the cache lines of elements [begin, end) of the tensors the op reads; a
// streamed output (streams_output) is left out, so its lines are never read in. Every
// function on this path is always inlined: GCC 12 drops the calls of a function whose only
// effect is a prefetch (it counts as pure), lambdas included.
template <typename T>
BK_HD void prefetch_lines(T* address, int64_t begin, int64_t end) {
  constexpr int kLineBytes = 64;
  constexpr int kWrite = std::is_const_v<T> ? 0 : 1;
  const char* last = reinterpret_cast<const char*>(address + end);
  for (const char* line = reinterpret_cast<const char*>(address + begin); line < last;
       line += kLineBytes) {
    __builtin_prefetch(line, kWrite);
  }
}

// Whether tensor I of ``tensors`` repeats the address of an earlier one (the fused ops list
// their unused slots that way), whose lines are already prefetched.
template <std::size_t I, typename Tensors, std::size_t... J>
BK_HD bool repeats_earlier(const Tensors& tensors, std::index_sequence<J...>) {
  const void* address = std::get<I>(tensors);
  return ((static_cast<const void*>(std::get<J>(tensors)) == address) || ...);
}

template <typename Op, std::size_t... I>
BK_HD void prefetch(const Op& op, int64_t begin, int64_t end, std::index_sequence<I...>) {
  const auto tensors = op.tensors();
  (((I == 0 && streams_output<Op>) || repeats_earlier<I>(tensors, std::make_index_sequence<I>())
       ? void()
       : prefetch_lines(std::get<I>(tensors), begin, end)),
   ...);
}

template <typename Op>
BK_HD void prefetch(const Op& op, int64_t begin, int64_t end) {
  using Tensors = decltype(op.tensors());
  prefetch(op, begin, end, std::make_index_sequence<std::tuple_size_v<Tensors>>());
}

// Copy ``bytes`` from ``source`` to ``target`` with non-temporal stores where the target
// is 16-byte aligned (x86): the target's cache lines are written without first being read.
BK_HD void stream_out(void* target, const void* source, std::size_t bytes) {
  char* to = static_cast<char*>(target);
  const char* from = static_cast<const char*>(source);
#if defined(BK_STREAMING_STORES)
  const std::size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(to) % 16) % 16);
  std::memcpy(to, from, head);
  std::size_t done = head;
  for (; done + 16 <= bytes; done += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(to + done),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + done)));
  }
  std::memcpy(to + done, from + done, bytes - done);
#else
  std::memcpy(to, from, bytes);
#endif
}

#if defined(BK_STREAMING_STORES)
// apply()'s output policy for a streamed output: non-temporal stores of whole 16-byte
// words, which must be aligned.
struct StreamingStore {
  template <int N, typename T>
  BK_HD static void put(T* target, const T (&values)[N]) {
    static_assert(N * sizeof(T) % 16 == 0, "streaming stores write whole 16-byte words");
    for (std::size_t word = 0; word < N * sizeof(T) / 16; ++word) {
      __m128i bits;
      std::memcpy(&bits, reinterpret_cast<const char*>(values) + 16 * word, 16);
      _mm_stream_si128(reinterpret_cast<__m128i*>(target) + word, bits);
    }
  }
};
#endif

// A streamed output skips the cache, so whoever reads it next reads it from memory. That is
// worth it only when the output would not have stayed in cache anyway: at least this many
// bytes per chunk (about two cores' L2 caches).
constexpr int64_t kStreamMinBytes = int64_t{1} << 20;

template <typename Op>
using output_t = std::remove_pointer_t<std::tuple_element_t<0, decltype(std::declval<const Op&>().tensors())>>;

// The op on elements begin... that writes its output to buffer[0...].
template <typename Op, std::size_t... I>
BK_HD Op into(const Op& op, output_t<Op>* buffer, int64_t begin, std::index_sequence<0, I...>) {
  const auto tensors = op.tensors();
  return op.with_tensors(buffer, std::get<I>(tensors) + begin...);
}

// One block of an op that only writes its output (streams_output): computed into a buffer
// that stays in L1, then streamed out.
template <typename Op>
BK_HD int64_t streamed_block(const Op& op, int64_t begin, int64_t end) {
  alignas(64) output_t<Op> buffer[kBlock];
  constexpr std::size_t kTensors = std::tuple_size_v<decltype(op.tensors())>;
  const Op into_buffer = into(op, buffer, begin, std::make_index_sequence<kTensors>());
  int32_t skipped = 0;
  for (int64_t i = 0; i < end - begin; ++i) skipped += into_buffer.template apply<1>(i);
  stream_out(std::get<0>(op.tensors()) + begin, buffer, (end - begin) * sizeof(output_t<Op>));
  return skipped;
}

// A streamed output whose elements are as wide as the op's math (fp32, fp64) is stored
// straight from the vector registers instead, with no buffer between, which saves the
// buffer's extra pass through L1.
// Narrower outputs keep the buffer, whose rounding loop the compiler vectorizes (the
// rounding in the vector form it does not), and so do tensors that are not aligned alike.
template <typename Op>
constexpr bool streams_from_registers =
    streams_output<Op> && std::is_same_v<output_t<Op>, typename Op::T>;

template <typename Op>
BK_HD int64_t register_streamed_block(const Op& op, int64_t begin, int64_t end) {
#if defined(BK_STREAMING_STORES)
  const int64_t aligned = first_aligned(op, begin, end);
  if (aligned >= 0) {
    int64_t i = begin;
    int32_t skipped = 0;
    for (; i < aligned; ++i) skipped += op.template apply<1>(i);
    for (; i + Op::kVec <= end; i += Op::kVec) {
      skipped += op.template apply<Op::kVec, 1, StreamingStore>(i);
    }
    for (; i < end; ++i) skipped += op.template apply<1>(i);
    return skipped;
  }
#endif
  return streamed_block(op, begin, end);
}

template <typename Op>
BK_HD int64_t cached_block(const Op& op, int64_t begin, int64_t end) {
  int32_t skipped = 0;
  for (int64_t i = begin; i < end; ++i) skipped += op.template apply<1>(i);
  return skipped;
}

// An op that rounds to its storage dtype between steps of its math (the fused optimizer
// steps) runs on its own storage: in float buffers it would round to float instead.
template <typename Op>
constexpr bool rounds_to_storage = requires { requires Op::kRoundsToStorage; };

// The fused optimizer steps (cpu_fused_blocks.h) go in smaller blocks, each prefetching the
// block three ahead: a block of theirs spends long in its divisions and square roots, and
// 256 elements of five or six tensors at once, prefetched one block ahead, came as a burst
// that stalled the core on memory and then left memory idle through the arithmetic
// (measured: 49 ms for AdamW + EMA on 32M fp32 parameters against 36 ms so).
template <typename Op>
constexpr int64_t block_size = is_fused_step<Op> ? 64 : kBlock;
template <typename Op>
constexpr int64_t prefetch_distance = is_fused_step<Op> ? 3 * block_size<Op> : block_size<Op>;

// Whether the clone kIsa runs the op's blocks through float buffers (cpu_half_staging.h).
template <CpuIsa kIsa, typename Op>
constexpr bool runs_staged() {
#if defined(BK_HALF_STAGING)
  return kIsa != CpuIsa::kBaseline && has_half_storage<Op> && !rounds_to_storage<Op>;
#else
  return false;
#endif
}

// Where the software prefetch stays off, leaving the stream to the hardware prefetcher:
// - in the AVX-512 clone, but for the fused optimizer steps: on the AVX-512 CPU it was
//   measured on (AMD EPYC, 64M and 4M fp32 elements, one thread, standalone loops of our
//   blocks, medians of 21), prefetching the next block slowed the EMA from 21.9 to 24.1 ms
//   and the four-profile EMA from 3.2 to 4.9 ms at 4M;
// - for a staged op that streams its output (the two-point average of 16-bit tensors): its
//   widening loops are nothing but loads, and a standalone loop of its bf16 pattern took
//   16.9-19.4 ms with the prefetch against 14.4-15.5 ms without (64M, medians of 31).
template <CpuIsa kIsa, typename Op>
constexpr bool prefetches =
    is_fused_step<Op> ||
    (kIsa != CpuIsa::kAvx512 && !(runs_staged<kIsa, Op>() && streams_output<Op>));

// One block of an op; kIsa: the clone this runs in.
template <CpuIsa kIsa, typename Op>
BK_HD int64_t one_block(const Op& op, int64_t block, int64_t block_end, bool stream) {
  if constexpr (is_fused_step<Op>) {
    return fused_block<block_size<Op>>(op, block, block_end);
  }
#if defined(BK_HALF_STAGING)
  if constexpr (runs_staged<kIsa, Op>()) {
    return staged_block<kBlock, kIsa == CpuIsa::kAvx512>(op, block, block_end, stream);
  }
#endif
  if constexpr (has_profiles<Op>) {
    return op.apply_all_valid(block, block_end);  // the caller has checked every profile
  }
  if constexpr (streams_output<Op>) {
    if (stream) {
      if constexpr (streams_from_registers<Op>) {
        return register_streamed_block(op, block, block_end);
      } else {
        return streamed_block(op, block, block_end);
      }
    }
  }
  return cached_block(op, block, block_end);
}

// kIsa: the clone this loop runs in. In the AVX2 and AVX-512 clones, 16-bit float storage
// goes through float buffers (cpu_half_staging.h).
template <CpuIsa kIsa, typename Op>
BK_HD int64_t plain_loop(const Op op, int64_t begin, int64_t end) {
  bool stream = false;
  if constexpr (streams_output<Op>) {
    stream = (end - begin) * static_cast<int64_t>(sizeof(output_t<Op>)) >= kStreamMinBytes;
  }
  // A K-profile op, every profile valid: all profiles per element (16-bit storage through
  // float buffers, the weights widened once for all profiles).
  bool all_profiles = false;
  if constexpr (has_profiles<Op>) {
    all_profiles = true;
    for (int p = 0; p < Op::kProfiles; ++p) all_profiles = all_profiles && op.profile_valid(p);
  }
  int64_t skipped = 0;
  for (int64_t block = begin; block < end; block += block_size<Op>) {
    const int64_t block_end = std::min(end, block + block_size<Op>);
    if constexpr (prefetches<kIsa, Op>) {
      const int64_t ahead = std::min(end, block + prefetch_distance<Op>);
      prefetch(op, ahead, std::min(end, ahead + block_size<Op>));
    }
    if constexpr (has_profiles<Op>) {
      if (all_profiles) {
        skipped += one_block<kIsa>(op, block, block_end, false);
        continue;
      }
      // Each profile in turn on this block, whose weights stay in L1 after the first (an
      // invalid profile is skipped).
      for (int p = 0; p < Op::kProfiles; ++p) {
        skipped += op.profile_valid(p) ? one_block<kIsa>(op.profile(p), block, block_end, false)
                                       : block_end - block;
      }
    } else {
      skipped += one_block<kIsa>(op, block, block_end, stream);
    }
  }
#if defined(BK_STREAMING_STORES)
  if (stream) _mm_sfence();  // order the streamed stores
#endif
  return skipped;
}

template <CpuIsa kIsa, typename Op>
BK_HD int64_t cpu_loop(const Op& op_in, int64_t begin, int64_t end) {
  // A local copy, so stores cannot alias its fields; and when the op has a non-finite
  // policy, a loop per policy with the flag a known constant, so the propagate loop
  // carries no test and no count.
  Op op = op_in.resolved();
  // An out-of-range tensor hyperparameter: nothing written, every element counted skipped.
  if (!hparams_valid(op)) return end - begin;
  if (!writes_anything(op)) return 0;
  if constexpr (requires { op.skip_nonfinite; }) {
    if (op.skip_nonfinite) {
      op.skip_nonfinite = true;
      return plain_loop<kIsa>(op, begin, end);
    }
    op.skip_nonfinite = false;
    return plain_loop<kIsa>(op, begin, end);
  }
  // The swap's direction likewise, so each direction's loop vectorizes.
  if constexpr (requires { op.inverse; }) {
    if (op.inverse) {
      op.inverse = true;
      return plain_loop<kIsa>(op, begin, end);
    }
    op.inverse = false;
    return plain_loop<kIsa>(op, begin, end);
  }
  return plain_loop<kIsa>(op, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Op>
__attribute__((target("avx2,fma,f16c"))) int64_t cpu_loop_avx2(const Op& op, int64_t begin,
                                                                int64_t end) {
  return cpu_loop<CpuIsa::kAvx2>(op, begin, end);
}
// prefer-vector-width=512: GCC's default tuning keeps to 256-bit vectors on some CPUs.
template <typename Op>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
int64_t cpu_loop_avx512(const Op& op, int64_t begin, int64_t end) {
  return cpu_loop<CpuIsa::kAvx512>(op, begin, end);
}
#endif

template <typename Op>
int64_t cpu_chunk(const Op& op, int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (chosen_cpu_isa()) {
    case CpuIsa::kAvx512:
      return cpu_loop_avx512(op, begin, end);
    case CpuIsa::kAvx2:
      return cpu_loop_avx2(op, begin, end);
    case CpuIsa::kBaseline:
      break;
  }
#endif
  return cpu_loop<CpuIsa::kBaseline>(op, begin, end);
}

// Elements per task: large enough to amortize a task, small enough for both cores.
constexpr int64_t kGrain = 1 << 15;

struct CpuExec {
  using DeviceGuard = NoDeviceGuard;
  template <typename Op>
  void run(const Op& op, int64_t numel, int64_t* skipped) const {
    std::atomic<int64_t> total{0};
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      total += cpu_chunk(op, begin, end);
    });
    if (skipped != nullptr) *skipped += total.load();
  }
  // A tensor of at most kGrain elements is one chunk, which parallel_for would run inline
  // over the whole range; calling it directly spares the per-tensor parallel_for setup.
  template <typename Op>
  void run_list(const std::vector<Op>& ops, const std::vector<int64_t>& numels,
                int64_t* skipped) const {
    int64_t small = 0;
    for (size_t t = 0; t < ops.size(); ++t) {
      if (numels[t] == 0) continue;
      if (numels[t] <= kGrain) {
        small += cpu_chunk(ops[t], 0, numels[t]);
      } else {
        run(ops[t], numels[t], skipped);
      }
    }
    if (skipped != nullptr) *skipped += small;
  }
};


inline const SimulatedGrid& checked_grid() {
  const SimulatedGrid& grid = simulated_grid();
  TORCH_CHECK_VALUE(grid.blocks > 0, "belay_kernels_grid: no simulated grid is set; use "
                    "tests/_grid.py's simulated_grid().");
  return grid;
}

struct SimulatedGridExec {
  using DeviceGuard = NoDeviceGuard;
  template <typename Op>
  void run(const Op& op, int64_t numel, int64_t* skipped) const {
    const SimulatedGrid& grid = checked_grid();
    int64_t total = 0;
    for (int64_t block = 0; block < grid.blocks; ++block) {
      for (int64_t thread = 0; thread < grid.threads; ++thread) {
        total += flat_body(op, numel, block, thread, grid.blocks, grid.threads);
      }
    }
    if (skipped != nullptr) *skipped += total;
  }
  template <typename Op>
  void run_list(const std::vector<Op>& ops, const std::vector<int64_t>& numels,
                int64_t* skipped) const {
    const SimulatedGrid& grid = checked_grid();
    int64_t total = 0;
    for (const auto& launch :
         plan_list_launches(ops, numels, grid.chunk, grid.blocks, grid.threads)) {
      for (int64_t block = 0; block < int64_t{launch.blocks} * launch.split; ++block) {
        for (int64_t thread = 0; thread < grid.threads; ++thread) {
          total += list_body(launch, block, thread, grid.threads);
        }
      }
    }
    if (skipped != nullptr) *skipped += total;
  }
};

}  // namespace

}  // namespace belay
