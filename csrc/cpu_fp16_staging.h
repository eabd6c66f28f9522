// fp16 storage on x86 CPUs with AVX2 and F16C: the CPU loop widens a block of each fp16
// tensor into a float buffer with F16C (vcvtph2ps, eight elements an instruction), runs the
// op on the buffers in float, and rounds the results back with vcvtps2ph.
//
// Element by element, the compiler turns c10's fp16 conversions into long integer
// sequences: the extension is built for baseline x86-64, so c10 cannot use F16C itself, and
// those sequences cost more than the memory traffic. bf16 is left to the compiler: its
// conversions are a few vector integer instructions, and buffers do not help it.
//
// The results are c10's to the bit, NaN payloads aside: both round to nearest, ties to
// even. An fp16 NaN keeps (the top of) its payload through F16C, as in torch's own
// vectorized CPU kernels, where c10's scalar code gives 0x7E00 with the sign. Compared on
// all 2^32 fp32 inputs (rounding) and all 2^16 fp16 inputs (widening).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define BK_FP16_STAGING 1

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/Half.h>

#include "element_ops.h"

#define BK_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

namespace belay {

template <typename T>
constexpr bool is_fp16 = std::is_same_v<std::remove_const_t<T>, c10::Half>;

template <typename Tuple>
struct AnyFp16;
template <typename... Pointers>
struct AnyFp16<std::tuple<Pointers...>> {
  static constexpr bool value = (is_fp16<std::remove_pointer_t<Pointers>> || ...);
};

// Whether any tensor of the op has fp16 storage.
template <typename Op>
constexpr bool has_fp16_storage = AnyFp16<decltype(std::declval<const Op&>().tensors())>::value;

// --- bulk conversions (called once per block and tensor) ---------------------------------------

BK_AVX2_F16C inline void widen(const c10::Half* from, float* to, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(to + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
  }
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

// With ``stream``, the 16-byte words of ``to`` are written with non-temporal stores.
BK_AVX2_F16C inline void narrow(const float* from, c10::Half* to, int64_t n, bool stream) {
  int64_t i = 0;
  if (stream) {
    for (; i < n && reinterpret_cast<uintptr_t>(to + i) % 16 != 0; ++i) {
      to[i] = static_cast<c10::Half>(from[i]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m128i rounded = _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT);
    auto* word = reinterpret_cast<__m128i*>(to + i);
    stream ? _mm_stream_si128(word, rounded) : _mm_storeu_si128(word, rounded);
  }
  for (; i < n; ++i) to[i] = static_cast<c10::Half>(from[i]);
}

// --- one block through float buffers -----------------------------------------------------------

// Where the op in float finds tensor I: its buffer for fp16 storage, else the tensor
// itself from ``begin`` on.
template <typename T>
BK_HD auto staged_address(T* address, float* buffer, int64_t begin) {
  if constexpr (!is_fp16<T>) {
    return address + begin;
  } else if constexpr (std::is_const_v<T>) {
    return static_cast<const float*>(buffer);
  } else {
    return buffer;
  }
}

// An output the op only writes (streams_output) is not read, so not widened.
template <std::size_t I, typename Op, typename T>
BK_HD void widen_block(const T* address, float* buffer, int64_t begin, int64_t n) {
  if constexpr (is_fp16<T> && !(I == 0 && streams_output<Op>)) {
    widen(address + begin, buffer, n);
  }
}

template <std::size_t I, typename Op, typename T>
BK_HD void narrow_block(const float* buffer, T* address, int64_t begin, int64_t n,
                        bool stream) {
  if constexpr (is_fp16<T> && !std::is_const_v<T>) {
    narrow(buffer, address + begin, n, stream && I == 0 && streams_output<Op>);
  }
}

// Elements [begin, end), at most kBlock of them, of an op with fp16 storage; ``stream``
// as for streamed_block. Returns the count of skipped elements.
template <int64_t kBlock, typename Op, std::size_t... I>
BK_HD int64_t staged_block(const Op& op, int64_t begin, int64_t end, bool stream,
                           std::index_sequence<I...>) {
  const auto tensors = op.tensors();
  const int64_t n = end - begin;
  alignas(64) float buffers[sizeof...(I)][kBlock];
  (widen_block<I, Op>(std::get<I>(tensors), buffers[I], begin, n), ...);
  const auto in_float = op.with_tensors(staged_address(std::get<I>(tensors), buffers[I], begin)...);
  int32_t skipped = 0;
  for (int64_t i = 0; i < n; ++i) skipped += in_float.template apply<1>(i);
  (narrow_block<I, Op>(buffers[I], std::get<I>(tensors), begin, n, stream), ...);
  return skipped;
}

template <int64_t kBlock, typename Op>
BK_HD int64_t staged_block(const Op& op, int64_t begin, int64_t end, bool stream) {
  constexpr std::size_t kTensors = std::tuple_size_v<decltype(op.tensors())>;
  return staged_block<kBlock>(op, begin, end, stream, std::make_index_sequence<kTensors>());
}

}  // namespace belay

#endif
