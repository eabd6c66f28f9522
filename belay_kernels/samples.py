"""Fresh values shaped like a model's weights, for the benchmarks and the tests."""

from __future__ import annotations

import torch


def random_like_model(n: int, dtype: torch.dtype, *, generator: torch.Generator) -> torch.Tensor:
    """Fresh, never-zero values with a model-like spread (mostly small, some large)."""
    values = torch.randn(n, generator=generator, dtype=torch.float64)
    values = values * torch.exp(torch.randn(n, generator=generator, dtype=torch.float64))
    return values.to(dtype)
