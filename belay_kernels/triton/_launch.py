"""Host side of every launcher: block size, dtype mapping, scalar encoding, grids and
the pointer table of the tensor-list variants."""

from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Block size and warps. An update streams 2-4 tensors and does a few flops per element,
# so it is bound by memory bandwidth: what matters is enough bytes in flight per SM and
# 128-bit accesses, not arithmetic. 2048 elements on 4 warps gives each thread 16
# elements: four 128-bit accesses per fp32 tensor (two per bf16/fp16 tensor, eight
# 64-bit-element pairs for fp64), enough independent loads to cover DRAM latency, at a
# register count that still allows high occupancy (see bench/README.md, "Triton: static
# PTX check", for the registers ptxas reports). One program per block keeps the grid
# large (half a million programs for 1B elements) so the tail effect is negligible.
# This is a heuristic; belay_kernels.triton.measure reports the achieved bandwidth.
BLOCK = 2048
NUM_WARPS = 4

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
# The integer views the swap kernel exchanges (bits, never values).
TL_DTYPES_BITS = {torch.int16: tl.int16, torch.int32: tl.int32, torch.int64: tl.int64}


def compute_dtype(*dtypes: torch.dtype):
    """The math dtype: fp64 if any tensor is fp64, else fp32 (the reference's opmath)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def float_bits(value: float) -> int:
    """The int64 bit pattern of ``value`` as a float64 (decoded by _blocks._host_float)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def scalar_args(value, one_minus: bool = False) -> tuple[int, object, bool]:
    """(host bits, device tensor or None, FROM_PTR) for a rate given either way."""
    if isinstance(value, torch.Tensor):
        return 0, value, True
    value = float(value)
    return float_bits(1.0 - value if one_minus else value), None, False


class PointerTable:
    """The device table one tensor-list launch reads: addresses, sizes, first blocks and
    the owner of every block (layout in _blocks). Tables are cached by (addresses,
    sizes), so a training loop builds each once; build it before a CUDA-graph capture."""

    _cache: OrderedDict = OrderedDict()
    _CACHE_SIZE = 32

    def __init__(self, columns: list[list[torch.Tensor]]):
        device = columns[0][0].device
        sizes = [t.numel() for t in columns[0]]
        blocks = [triton.cdiv(n, BLOCK) for n in sizes]
        first = [0]
        for b in blocks[:-1]:
            first.append(first[-1] + b)
        addresses = [[t.data_ptr() for t in column] for column in columns]
        rows = [a for column in addresses for a in column] + sizes + first
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        owners = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)
        )
        self.owner = owners.to(device)
        self.num_tensors = len(sizes)
        self.num_blocks = sum(blocks)
        self.aligned = all(a % 16 == 0 for column in addresses for a in column)

    @classmethod
    def of(cls, columns: list[list[torch.Tensor]]) -> PointerTable:
        key = tuple((t.data_ptr(), t.numel(), t.device) for column in columns for t in column)
        table = cls._cache.get(key)
        if table is None:
            table = cls(columns)
            cls._cache[key] = table
            if len(cls._cache) > cls._CACHE_SIZE:
                cls._cache.popitem(last=False)
        else:
            cls._cache.move_to_end(key)
        return table

    def launch_args(self) -> tuple:
        return self.table, self.owner, self.num_tensors
