"""The fingerprints' inputs are the same bits on every machine (tests/_fingerprints.py):
under every ATen CPU capability this CPU has, and as pure-Python integer arithmetic
computes them, so no platform math library or vector path can enter them unnoticed."""

from fractions import Fraction

import pytest
import torch
from _capabilities import CAPABILITIES, supported
from _fingerprints import Inputs, _words, compute_in_subprocess


def test_inputs_are_the_same_bits_under_every_capability():
    """Every tensor every fingerprint case draws (and BELAY's optimizer steps on them),
    hashed per case in a process per capability: ``default`` (ATen's scalar code) and the
    vector ones the CPU has (``avx2``, and ``avx512`` where present)."""
    capabilities = [c for c in CAPABILITIES if supported(c)]
    if len(capabilities) < 2:
        pytest.skip(f"ATen runs only {capabilities} on this CPU: nothing to compare")
    hashes = {c: compute_in_subprocess("inputs", capability=c) for c in capabilities}
    first, *others = capabilities
    for other in others:
        differ = sorted(k for k in hashes[first] if hashes[first][k] != hashes[other].get(k))
        assert not differ, (
            f"{len(differ)} cases' inputs differ under {first} and {other}: {differ[:5]}"
        )
        assert hashes[first].keys() == hashes[other].keys()


# --- the generator, written again in pure-Python integers and fractions -------------------


def _splitmix64(seed: int, index: int) -> int:
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _value(word: int, mantissa_bits: int) -> Fraction:
    """sign * mantissa * 2**(binade - mantissa_bits), binade = 4 bits of the word - 8."""
    mantissa = ((word & (2**52 - 1)) | 2**52) >> (52 - mantissa_bits)
    binade = ((word >> 59) & 15) - 8
    magnitude = mantissa * Fraction(2) ** (binade - mantissa_bits)
    return -magnitude if word >> 63 else magnitude


MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def test_the_hash_is_splitmix64():
    # the first outputs of SplitMix64 seeded with 1234567, as its reference code gives them
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert _words(1234567, 0, 3).tolist() == want
    assert [_splitmix64(1234567, i) for i in range(3)] == want


@pytest.mark.parametrize("dtype", list(MANTISSA_BITS), ids=str)
def test_values_are_exact_integer_arithmetic(dtype):
    """Two tensors' worth of values, each exactly the fraction the integers give."""
    inputs = Inputs(2024)
    got = inputs.fresh((300, 45), dtype)
    words = [_splitmix64(2024, i) for i in range(345)]
    want = [_value(w, MANTISSA_BITS[dtype]) for w in words]
    assert [Fraction(x) for t in got for x in t.double().tolist()] == want
    assert inputs.drawn == 345


def test_a_small_case_is_these_literal_bits():
    """Seed 7, 9 elements with non-finite values: NaN, inf and -inf at the positions of
    the 3 smallest of the next 9 words, as bit patterns; the rest as in the test above."""
    want = {
        torch.float64: [
            0xFFF0000000000000,
            0x7FF8000000000000,
            0xC0384080BAB12A02,
            0xBF9AEB70673E29CB,
            0x40533B666A1E21DA,
            0x3FEABE86CBBEAA11,
            0x405BC4A133C2D0F6,
            0x401CD6513D02BEFE,
            0x7FF0000000000000,
        ],
        torch.float32: [
            0xFF800000,
            0x7FC00000,
            0xC1C20405,
            0xBCD75B83,
            0x4299DB33,
            0x3F55F436,
            0x42DE2509,
            0x40E6B289,
            0x7F800000,
        ],
        torch.bfloat16: [0xFF80, 0x7FC0, 0xC1C2, 0xBCD7, 0x4299, 0x3F55, 0x42DE, 0x40E6, 0x7F80],
        torch.float16: [0xFC00, 0x7E00, 0xCE10, 0xA6BA, 0x54CE, 0x3AAF, 0x56F1, 0x4735, 0x7C00],
    }
    views = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    for dtype, bits in want.items():
        (got,) = Inputs(7).fresh((9,), dtype, nonfinite=True)
        width = 8 * got.element_size()
        unsigned = [b % 2**width for b in got.view(views[got.element_size()]).tolist()]
        assert unsigned == bits, dtype
    # the finite ones are those of the integer arithmetic: words 0-8 make the values,
    # words 9-17 pick the non-finite positions
    order = sorted(range(9), key=lambda i: (_splitmix64(7, 9 + i), i))
    assert order[:3] == [1, 8, 0]  # NaN, inf, -inf
    (float64,) = Inputs(7).fresh((9,), torch.float64, nonfinite=True)
    assert (
        Fraction(float64[2].item())
        == _value(_splitmix64(7, 2), 52)
        == Fraction(-0x184080BAB12A02, 2**48)
    )
