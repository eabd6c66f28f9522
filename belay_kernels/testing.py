"""Shared test vocabulary: the dtype pairs every backend must cover, the odd sizes, the
one tolerance table used to compare any backend with the reference or a float64 oracle,
and a scoped intra-op thread count.

Importable by the test suite, the benchmarks and the experiments alike, so all speak of
the same cases.
"""

from __future__ import annotations

import contextlib

import torch

# (weights dtype, shadow dtype): same-dtype pairs and the mixed-precision normal case.
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)

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


def random_like_model(n: int, dtype: torch.dtype, *, generator: torch.Generator) -> torch.Tensor:
    """Fresh, never-zero values with a model-like spread (mostly small, some large)."""
    values = torch.randn(n, generator=generator, dtype=torch.float64)
    values = values * torch.exp(torch.randn(n, generator=generator, dtype=torch.float64))
    return values.to(dtype)


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch's intra-op thread count set to ``n`` inside the block, restored after. Tiny
    tensors run fastest on one thread, and the development machine is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
