// 16-bit float storage (fp16, bf16) on x86 CPUs with AVX2: the CPU loop widens a block of
// each 16-bit tensor into a float buffer, eight elements at a time (sixteen in the AVX-512
// clone), runs the op on the buffers in float, and rounds the results back the same way.
//
// Element by element, the compiler turns c10's fp16 conversions into long integer
// sequences (the extension is built for baseline x86-64, so c10 cannot use F16C itself),
// and vectorizes c10's bf16 rounding into a loop slower than the memory: both cost more
// than the traffic of the ops that only move data (the two-point average).
//
// fp16 goes through F16C (vcvtph2ps, vcvtps2ph). Its results are c10's to the bit, NaN
// payloads aside: both round to nearest, ties to even. An fp16 NaN keeps (the top of) its
// payload through F16C, as in torch's own vectorized CPU kernels, where c10's scalar code
// gives 0x7E00 with the sign. Compared on all 2^32 fp32 inputs (rounding) and all 2^16
// fp16 inputs (widening).
//
// bf16 is c10's integer rounding written in vector code (to nearest, ties to even; any NaN
// becomes 0x7FC0), bit for bit c10's on all 2^32 fp32 inputs at both widths below; the
// 512-bit fp16 rounding is F16C's on all of them too. Not AVX-512 BF16's vcvtneps2bf16:
// it flushes subnormal inputs to zero and keeps NaN payloads, so its bits differ from the
// reference's. Widening is a shift, exact.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define BK_HALF_STAGING 1

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "element_ops.h"

#define BK_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#define BK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace belay {

template <typename T>
constexpr bool is_half = std::is_same_v<std::remove_const_t<T>, c10::Half> ||
                         std::is_same_v<std::remove_const_t<T>, c10::BFloat16>;

template <typename Tuple>
struct AnyHalf;
template <typename... Pointers>
struct AnyHalf<std::tuple<Pointers...>> {
  static constexpr bool value = (is_half<std::remove_pointer_t<Pointers>> || ...);
};

// Whether any tensor of the op has 16-bit float storage.
template <typename Op>
constexpr bool has_half_storage = AnyHalf<decltype(std::declval<const Op&>().tensors())>::value;

// Eight elements of each 16-bit format, to float and back.
BK_AVX2_F16C inline __m256 widened(__m128i halves, const c10::Half*) {
  return _mm256_cvtph_ps(halves);
}
BK_AVX2_F16C inline __m256 widened(__m128i halves, const c10::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
BK_AVX2_F16C inline __m128i narrowed(__m256 x, const c10::Half*) {
  return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}
BK_AVX2_F16C inline __m128i narrowed(__m256 x, const c10::BFloat16*) {
  // c10::detail::round_to_nearest_even: bits + 0x7FFF + (bit 16), the top half; NaN 0x7FC0.
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i result = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // Every lane is below 0x10000, so packing with unsigned saturation keeps it.
  return _mm_packus_epi32(_mm256_castsi256_si128(result), _mm256_extracti128_si256(result, 1));
}

// Sixteen elements at once, for the AVX-512 clone: the same conversions (the bf16 rounding
// with a mask for its NaNs), twice as wide, so that an op that only moves 16-bit data (the
// two-point average) spends fewer instructions per cache line it streams.
BK_AVX512 inline __m512 widened(__m256i halves, const c10::Half*) {
  return _mm512_cvtph_ps(halves);
}
BK_AVX512 inline __m512 widened(__m256i halves, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
BK_AVX512 inline __m256i narrowed(__m512 x, const c10::Half*) {
  return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}
BK_AVX512 inline __m256i narrowed(__m512 x, const c10::BFloat16*) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0)));
}

// --- bulk conversions (called once per block and tensor) ---------------------------------------

template <typename Half>
BK_AVX2_F16C inline void widen(const Half* from, float* to, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(
        to + i, widened(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i)), from));
  }
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

template <typename Half>
BK_AVX512 inline void widen_wide(const Half* from, float* to, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(
        to + i, widened(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + i)), from));
  }
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

// With ``stream``, the 16-byte words of ``to`` are written with non-temporal stores.
template <typename Half>
BK_AVX2_F16C inline void narrow(const float* from, Half* to, int64_t n, bool stream) {
  int64_t i = 0;
  if (stream) {
    for (; i < n && reinterpret_cast<uintptr_t>(to + i) % 16 != 0; ++i) {
      to[i] = static_cast<Half>(from[i]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m128i rounded = narrowed(_mm256_loadu_ps(from + i), to);
    auto* word = reinterpret_cast<__m128i*>(to + i);
    stream ? _mm_stream_si128(word, rounded) : _mm_storeu_si128(word, rounded);
  }
  for (; i < n; ++i) to[i] = static_cast<Half>(from[i]);
}

// The same sixteen at once: streamed 32-byte words.
template <typename Half>
BK_AVX512 inline void narrow_wide(const float* from, Half* to, int64_t n, bool stream) {
  int64_t i = 0;
  if (stream) {
    for (; i < n && reinterpret_cast<uintptr_t>(to + i) % 32 != 0; ++i) {
      to[i] = static_cast<Half>(from[i]);
    }
  }
  for (; i + 16 <= n; i += 16) {
    const __m256i rounded = narrowed(_mm512_loadu_ps(from + i), to);
    auto* word = reinterpret_cast<__m256i*>(to + i);
    stream ? _mm256_stream_si256(word, rounded) : _mm256_storeu_si256(word, rounded);
  }
  for (; i < n; ++i) to[i] = static_cast<Half>(from[i]);
}

// --- one block through float buffers -----------------------------------------------------------

// Where the op in float finds tensor I: its buffer for 16-bit storage, else the tensor
// itself from ``begin`` on.
template <typename T>
BK_HD auto staged_address(T* address, float* buffer, int64_t begin) {
  if constexpr (!is_half<T>) {
    return address + begin;
  } else if constexpr (std::is_const_v<T>) {
    return static_cast<const float*>(buffer);
  } else {
    return buffer;
  }
}

// An output the op only writes (streams_output) is not read, so not widened. kWide: in
// the AVX-512 clone, sixteen elements at once.
template <std::size_t I, typename Op, bool kWide, typename T>
BK_HD void widen_block(const T* address, float* buffer, int64_t begin, int64_t n) {
  if constexpr (is_half<T> && !(I == 0 && streams_output<Op>)) {
    if constexpr (kWide) {
      widen_wide(address + begin, buffer, n);
    } else {
      widen(address + begin, buffer, n);
    }
  }
}

template <std::size_t I, typename Op, bool kWide, typename T>
BK_HD void narrow_block(const float* buffer, T* address, int64_t begin, int64_t n,
                        bool stream) {
  if constexpr (is_half<T> && !std::is_const_v<T>) {
    const bool streamed = stream && I == 0 && streams_output<Op>;
    if constexpr (kWide) {
      narrow_wide(buffer, address + begin, n, streamed);
    } else {
      narrow(buffer, address + begin, n, streamed);
    }
  }
}

// Elements [begin, end), at most kBlock of them, of an op with 16-bit storage; ``stream``
// as for streamed_block, kWide as for widen_block. Returns the count of skipped elements.
template <int64_t kBlock, bool kWide, typename Op, std::size_t... I>
BK_HD int64_t staged_block(const Op& op, int64_t begin, int64_t end, bool stream,
                           std::index_sequence<I...>) {
  const auto tensors = op.tensors();
  const int64_t n = end - begin;
  alignas(64) float buffers[sizeof...(I)][kBlock];
  (widen_block<I, Op, kWide>(std::get<I>(tensors), buffers[I], begin, n), ...);
  const auto in_float = op.with_tensors(staged_address(std::get<I>(tensors), buffers[I], begin)...);
  int64_t skipped = 0;
  if constexpr (has_profiles<Op>) {
    skipped = in_float.apply_all_valid(0, n);  // the caller has checked every profile
  } else {
    int32_t kept = 0;
    for (int64_t i = 0; i < n; ++i) kept += in_float.template apply<1>(i);
    skipped = kept;
  }
  (narrow_block<I, Op, kWide>(buffers[I], std::get<I>(tensors), begin, n, stream), ...);
  return skipped;
}

template <int64_t kBlock, bool kWide, typename Op>
BK_HD int64_t staged_block(const Op& op, int64_t begin, int64_t end, bool stream) {
  constexpr std::size_t kTensors = std::tuple_size_v<decltype(op.tensors())>;
  return staged_block<kBlock, kWide>(op, begin, end, stream,
                                     std::make_index_sequence<kTensors>());
}

}  // namespace belay

#endif
