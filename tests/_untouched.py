"""Bit-for-bit snapshots of every tensor a call could write, for the bad-input tests.

A snapshot copies each tensor's whole storage (so an expanded view, or a slice of a larger
buffer, is covered where it really lives), and ``assert_unchanged`` compares the bytes,
NaN payloads included.
"""

from __future__ import annotations

import torch

from belay_kernels import backends


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


class Snapshot:
    def __init__(self, *tensors: torch.Tensor):
        # meta tensors hold no data to compare
        self.tensors = [t for t in _flatten(tensors) if t.device.type != "meta"]
        self.before = [_storage_bytes(t) for t in self.tensors]

    def changed(self) -> list[int]:
        """Indices of the tensors whose storage differs from the snapshot."""
        return [
            i
            for i, (t, b) in enumerate(zip(self.tensors, self.before))
            if not torch.equal(_storage_bytes(t), b)
        ]

    def assert_unchanged(self) -> None:
        changed = self.changed()
        assert not changed, f"tensors {changed} were written before the error"


def _flatten(items):
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            yield from _flatten(item)


def cpu_backends() -> list[str]:
    """The backends that run on CPU tensors here: torch, and cpp when it is built."""
    return [name for name in ("torch", "cpp") if backends()[name].startswith("available")]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t``, for comparisons that must hold for NaN too."""
    size = t.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.contiguous().view(as_int)
