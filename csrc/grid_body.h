// The bodies of the CUDA kernels, written as functions of explicit grid coordinates
// (block, thread) so that the CPU can run them over a simulated grid in the tests
// (tests/test_extension_grid.py). cuda_kernels.cu's __global__ functions only call these.
//
// A span [begin, end) is covered by ``thread_count`` threads in grid-stride order:
//   head  the first few elements, one by one, up to the first index where every
//         tensor is 16-byte aligned (all of them, if their alignments never agree);
//   body  whole vectors of kVec elements with 128-bit loads and stores, vectors_in_flight
//         of them per thread at a time (all loaded before any is stored);
//   tail  the last < kVec elements, one by one.
// Indices are 64-bit throughout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "element_ops.h"

namespace belay {

// Vectors a thread loads before it stores any: 16 elements (4 where the math is fp64), so
// a thread has 64 bytes of each fp32 tensor in flight, at a register cost that stays
// under kernels' cap without spilling (ptxas -v, bench/README.md).
// An op may ask for fewer (kVectorsInFlight): the fused optimizer steps hold five tensors'
// vectors and their scalars at once.
template <typename Op>
constexpr int vectors_in_flight() {
  if constexpr (requires { Op::kVectorsInFlight; }) return Op::kVectorsInFlight;
  constexpr bool fp64_math = requires { requires sizeof(typename Op::T) == 8; };
  return std::clamp((fp64_math ? 4 : 16) / Op::kVec, 1, 4);
}

template <typename Op>
BK_HD int64_t span_body(const Op& op, int64_t begin, int64_t end, int64_t rank,
                        int64_t thread_count) {
  constexpr int V = Op::kVec;
  // An out-of-range tensor hyperparameter: nothing written, the span counted as skipped.
  if (!hparams_valid(op)) return rank == 0 ? end - begin : 0;
  if (!writes_anything(op)) return 0;
  const int64_t aligned = first_aligned(op, begin, end);
  const int64_t head_end = aligned < 0 ? end : aligned;  // all scalar where none aligns
  int64_t skipped = 0;
  for (int64_t i = begin + rank; i < head_end; i += thread_count) {
    skipped += op.template apply<1>(i);
  }
  constexpr int U = vectors_in_flight<Op>();
  const int64_t vectors = (end - head_end) / V;
  int64_t v = rank;
  for (; v + (U - 1) * thread_count < vectors; v += U * thread_count) {
    skipped += op.template apply<V, U>(head_end + v * V, thread_count * V);
  }
  for (; v < vectors; v += thread_count) {
    skipped += op.template apply<V>(head_end + v * V);
  }
  for (int64_t i = head_end + vectors * V + rank; i < end; i += thread_count) {
    skipped += op.template apply<1>(i);
  }
  return skipped;
}

// One flat tensor (or tuple of same-length tensors) over the whole grid.
template <typename Op>
BK_HD int64_t flat_body(const Op& op, int64_t numel, int64_t block, int64_t thread,
                        int64_t grid_blocks, int64_t block_threads) {
  return span_body(op.resolved(), 0, numel, block * block_threads + thread,
                   grid_blocks * block_threads);
}

// --- tensor lists: one launch covers many tensors (the idea of apex's multi_tensor_apply).
// Every tensor is cut into chunks of ``chunk`` elements; the ``split`` blocks
// b * split ... b * split + split - 1 of a launch share chunk block_chunk[b] of tensor
// block_tensor[b]. The launch description is a kernel argument, so it is kept under the
// 4 KiB parameter limit, which caps the chunks per launch; ``split`` lets such a launch
// still fill the GPU.
constexpr int kListMaxTensors = 24;
constexpr int kListMaxBlocks = 320;
constexpr int kListArgumentBytes = 4096;

// Tensors per launch: 24, or fewer for an op so large (K-profile EMA) that 24 of it would
// not fit in the argument beside the block table.
template <typename Op>
constexpr int list_max_tensors() {
  constexpr int64_t table = kListMaxBlocks * (sizeof(uint8_t) + sizeof(int32_t)) + 64;
  constexpr int64_t fit = (kListArgumentBytes - table) / (sizeof(Op) + sizeof(int64_t));
  static_assert(fit >= 1, "one op must fit in a list launch");
  return static_cast<int>(std::min<int64_t>(fit, kListMaxTensors));
}

template <typename Op>
struct ListLaunch {
  Op ops[list_max_tensors<Op>()];
  int64_t numels[list_max_tensors<Op>()];
  int64_t chunk;
  int32_t blocks;  // chunks; the grid has blocks * split blocks
  int32_t split;
  uint8_t block_tensor[kListMaxBlocks];
  int32_t block_chunk[kListMaxBlocks];
};

template <typename Op>
BK_HD int64_t list_body(const ListLaunch<Op>& launch, int64_t block, int64_t thread,
                        int64_t block_threads) {
  const int64_t entry = block / launch.split;
  const int64_t part = block % launch.split;
  const int tensor = launch.block_tensor[entry];
  const int64_t begin = launch.block_chunk[entry] * launch.chunk;
  const int64_t end = std::min(begin + launch.chunk, launch.numels[tensor]);
  return span_body(launch.ops[tensor].resolved(), begin, end, part * block_threads + thread,
                   launch.split * block_threads);
}

// Blocks per chunk: enough for the launch to cover ``resident`` blocks (what the GPU holds
// at once), but no more than give each thread one round of vectors in flight.
template <typename Op>
int32_t list_split(const ListLaunch<Op>& launch, int64_t resident, int64_t block_threads) {
  int64_t longest = 0;
  for (int b = 0; b < launch.blocks; ++b) {
    const int64_t begin = launch.block_chunk[b] * launch.chunk;
    longest = std::max(longest,
                       std::min(launch.chunk, launch.numels[launch.block_tensor[b]] - begin));
  }
  const int64_t per_block = std::max<int64_t>(1, block_threads * Op::kVec * vectors_in_flight<Op>());
  const int64_t useful = std::max<int64_t>(1, (longest + per_block - 1) / per_block);
  const int64_t wanted = (resident + launch.blocks - 1) / launch.blocks;
  return static_cast<int32_t>(std::clamp<int64_t>(wanted, 1, useful));
}

// Host side: cut a list into launches, each sized by list_split for a GPU that holds
// ``resident`` blocks of ``block_threads``. ``chunk`` must be a multiple of 16 elements so
// a chunk starts as aligned as its tensor.
template <typename Op>
std::vector<ListLaunch<Op>> plan_list_launches(const std::vector<Op>& ops,
                                               const std::vector<int64_t>& numels,
                                               int64_t chunk, int64_t resident,
                                               int64_t block_threads) {
  std::vector<ListLaunch<Op>> launches;
  ListLaunch<Op> current{};
  int tensors_in_current = 0;
  current.chunk = chunk;
  auto flush = [&]() {
    if (current.blocks > 0) {
      current.split = list_split(current, resident, block_threads);
      launches.push_back(current);
    }
    current = ListLaunch<Op>{};
    current.chunk = chunk;
    tensors_in_current = 0;
  };
  for (size_t t = 0; t < ops.size(); ++t) {
    if (numels[t] == 0) continue;
    if (tensors_in_current == list_max_tensors<Op>()) flush();
    const int slot = tensors_in_current++;
    current.ops[slot] = ops[t];
    current.numels[slot] = numels[t];
    const int64_t chunks = (numels[t] + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (current.blocks == kListMaxBlocks) {
        flush();  // the rest of this tensor goes on in a new launch
        current.ops[0] = ops[t];
        current.numels[0] = numels[t];
        tensors_in_current = 1;
      }
      const int b = current.blocks++;
      current.block_tensor[b] = static_cast<uint8_t>(tensors_in_current - 1);
      current.block_chunk[b] = static_cast<int32_t>(c);
    }
  }
  flush();
  return launches;
}

}  // namespace belay
