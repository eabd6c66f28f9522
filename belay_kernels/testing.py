"""Shared test vocabulary: the dtype pairs every backend must cover, the odd sizes, the
one tolerance table used to compare any backend with the reference or a float64 oracle,
and a scoped intra-op thread count.

Importable by the test suite, the benchmarks and the experiments alike, so all speak of
the same cases.
"""

from __future__ import annotations

import torch

from .methods import DTYPE_PAIRS  # noqa: F401 (the tests import these from here)
from .samples import random_like_model  # noqa: F401
from .threads import torch_threads  # noqa: F401

# Empty, one element, shorter than any vector, primes, and more than one block / chunk.
ODD_SIZES = (0, 1, 3, 31, 1009, 70_001)

# Per storage dtype: (atol, rtol) between two implementations of one formula. Both
# compute in fp32 (fp64 for fp64) and round once on store, so they differ by an ulp or
# two of the storage dtype, plus what many steps accumulate.
_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 2e-3),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = _TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Every element of ``actual`` (in its own dtype) within the table's tolerance of
    ``expected`` (any dtype); NaN must match NaN."""
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        equal_nan=True,
        msg=lambda m: f"{msg}\n{m}",
        **tolerance(actual.dtype),
    )


# --- the packed bf16/fp32 swap on every special fp32 word --------------------------------
# Hand-made shadow words: the GPU's canonical NaN, its negative, a NaN whose mantissa is
# only in the low half, x86's default NaN, +-0, +-inf, denormals, and then every high half
# under the low halves around the rounding tie (every NaN payload class, every sign).
NAMED_SHADOW_WORDS = {
    "gpu canonical NaN": 0x7FFFFFFF,
    "negative canonical NaN": 0xFFFFFFFF,
    "NaN in the low half": 0x7F800001,
    "x86 default NaN": 0xFFC00000,
    "quiet NaN": 0x7FC00000,
    "NaN payload 0x7FA5A5A5": 0x7FA5A5A5,
    "+0": 0x00000000,
    "-0": 0x80000000,
    "+inf": 0x7F800000,
    "-inf": 0xFF800000,
    "smallest denormal": 0x00000001,
    "largest denormal": 0x007FFFFF,
    "negative denormal": 0x807FFFFF,
    "largest finite": 0x7F7FFFFF,
}
_TIE_LOWS = (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)


def packed_swap_words() -> torch.Tensor:
    """The shadow words (int64, 32-bit values) the packed swap is tested on."""
    high = torch.arange(1 << 16, dtype=torch.int64)
    grid = torch.cat([(high << 16) | low for low in _TIE_LOWS])
    return torch.cat([torch.tensor(list(NAMED_SHADOW_WORDS.values()), dtype=torch.int64), grid])


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def packed_swap_case(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 weights, fp32 shadow) holding packed_swap_words(); the live weights take the
    shadow's high halves in another order, so they hold every special class too."""
    words = packed_swap_words()
    shadow = _as_int32(words).view(torch.float32).to(device)
    weights = _as_int32(words.flip(0) >> 16).to(torch.int16).view(torch.bfloat16).to(device)
    return weights, shadow


def check_packed_swap(weights: torch.Tensor, shadow: torch.Tensor, swap) -> None:
    """Runs ``swap(weights, shadow, inverse)`` forward on a packed_swap_case and checks what
    the model sees: a NaN shadow word is NaN (except the reference's documented spare
    words 0x7F81xxxx / 0xFF81xxxx, xxxx != 0), +-inf and +-0 stay themselves, a finite word
    is rounded to nearest with ties toward zero; the slot holds the live weights. Then
    the inverse must restore both tensors bit for bit."""
    before_w, before_s = weights.clone(), shadow.clone()
    swap(weights, shadow, False)
    words = before_s.cpu().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    high, low = words >> 16, words & 0xFFFF
    seen = weights.cpu().float()
    was = before_s.cpu()
    spare = ((high & 0x7FFF) == 0x7F81) & (low != 0)
    nan = torch.isnan(was)
    assert torch.isnan(seen[nan & ~spare]).all(), "a NaN shadow word became a number"
    assert not torch.isnan(seen[~nan]).any(), "a number became NaN"
    infinite = torch.isinf(was)
    assert torch.equal(seen[infinite], was[infinite]), "inf changed"
    finite = torch.isfinite(was)
    expected = (high + (low > 0x8000).to(torch.int64))[finite]
    got = weights.cpu().view(torch.int16).to(torch.int64)[finite] & 0xFFFF
    assert torch.equal(got, expected), "a finite word was not rounded to nearest, ties to zero"
    for index, name in enumerate(NAMED_SHADOW_WORDS):  # they come first
        assert torch.isnan(seen[index]) == torch.isnan(was[index]), name
    slot_high = (shadow.cpu().view(torch.int32).to(torch.int64) >> 16) & 0xFFFF
    live = before_w.cpu().view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(slot_high, live), "the slot does not hold the live weights"
    swap(weights, shadow, True)
    assert torch.equal(weights.view(torch.int16), before_w.view(torch.int16)), "weights"
    assert torch.equal(shadow.view(torch.int32), before_s.view(torch.int32)), "shadow"
