"""Host side of every launcher: block size, dtype mapping, scalar encoding, grids and
the pointer table of the tensor-list variants."""

from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Block size and warps. An update streams 2-4 tensors and does a few flops per element,
# so it is bound by memory bandwidth: what matters is 128-bit accesses, enough bytes in
# flight per SM, and registers low enough for high occupancy. The rule: 8 warps, and 8
# elements per thread (4 when the math is fp64): each fp32 tensor then moves as two
# 128-bit accesses per thread, each 16-bit tensor as one, each fp64 tensor as two.
# Registers follow the number of elements a thread holds in fp32/fp64, not the storage
# bytes; measured statically with ptxas (bench/README.md, "Triton: static PTX check"):
# 16 elements per thread took 80-112 registers for fp32 and up to 149 for bf16 BELAY on
# sm_90 (one 256-thread program per SM); 8 per thread takes 28-74 on sm_80 and sm_90,
# spilling nothing, while 8 fp64 elements spilled 8 bytes in BELAY on sm_80, hence 4 for
# fp64. One program per block keeps the grid large (half a million programs for 1B
# elements), so the tail wave is negligible. A heuristic, not tuned on a GPU:
# belay_kernels.triton.measure reports the bandwidth it achieves.
NUM_WARPS = 8
_THREADS = 32 * NUM_WARPS


def block_size(*dtypes: torch.dtype) -> int:
    """Elements per program for tensors of ``dtypes``."""
    elements_per_thread = 4 if any(d.itemsize == 8 for d in dtypes) else 8
    return _THREADS * elements_per_thread


def compute_dtype(*dtypes: torch.dtype):
    """The math dtype: fp64 if any tensor is fp64, else fp32 (the reference's opmath)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def float_bits(value: float) -> int:
    """The int64 bit pattern of ``value`` as a float64 (decoded by _blocks._host_float)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def shape_flags(*dtypes: torch.dtype) -> dict:
    """Block size and warps for tensors of ``dtypes``."""
    return {"BLOCK": block_size(*dtypes), "num_warps": NUM_WARPS}


def update_flags(skip_nonfinite: bool, skipped, dtypes) -> dict:
    """The flags every shadow update shares: non-finite policy, counter, math dtype, shape."""
    return {
        "SKIP_NONFINITE": bool(skip_nonfinite),
        "HAS_SKIPPED": skipped is not None,
        "COMPUTE": compute_dtype(*dtypes),
        **shape_flags(*dtypes),
    }


def launch_flat(kernel, tensors, args, flags) -> None:
    """One program per block of the flat tensors (nothing for empty ones)."""
    n = tensors[0].numel()
    if n:
        kernel[grid(n, flags["BLOCK"])](*tensors, n, *args, **flags)


def launch_foreach(kernel, columns, args, flags) -> None:
    """One launch over every block of every tensor in ``columns`` (lists, same lengths)."""
    table = PointerTable.of(columns)
    if table.num_blocks:
        kernel[(table.num_blocks,)](*table.launch_args(), *args, ALIGNED=table.aligned, **flags)


def scalar_args(value, one_minus: bool = False) -> tuple[int, object, bool]:
    """(host bits, device tensor or None, FROM_PTR) for a rate given either way."""
    if isinstance(value, torch.Tensor):
        return 0, value, True
    value = float(value)
    return float_bits(1.0 - value if one_minus else value), None, False


class PointerTable:
    """The device table one tensor-list launch reads (layout in _blocks): per column the
    element offsets from the column's base tensor, the sizes, the first blocks, and every
    block's owner. Tables are cached by (addresses, sizes), so a training loop builds each
    once; build it (run one step) before a CUDA-graph capture."""

    _cache: OrderedDict = OrderedDict()
    _CACHE_SIZE = 32

    def __init__(self, columns: list[list[torch.Tensor]]):
        self.block = block_size(*(column[0].dtype for column in columns))
        sizes = [t.numel() for t in columns[0]]
        blocks = [triton.cdiv(n, self.block) for n in sizes]
        first = [0]
        for b in blocks[:-1]:
            first.append(first[-1] + b)
        base_index = next((i for i, n in enumerate(sizes) if n), 0)
        self.bases = [column[base_index] for column in columns]
        rows = []
        for column, base in zip(columns, self.bases):
            rows += [(t.data_ptr() - base.data_ptr()) // t.element_size() for t in column]
        device = self.bases[0].device
        self.table = torch.tensor(rows + sizes + first, dtype=torch.int64).to(device)
        owners = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)
        )
        self.owner = owners.to(device)
        self.num_tensors = len(sizes)
        self.num_blocks = sum(blocks)
        self.aligned = all(t.data_ptr() % 16 == 0 for column in columns for t in column)

    @classmethod
    def of(cls, columns: list[list[torch.Tensor]]) -> PointerTable:
        key = tuple((t.data_ptr(), t.numel(), t.dtype, t.device) for c in columns for t in c)
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
        """table, owner, number of tensors, then each column's base tensor."""
        return (self.table, self.owner, self.num_tensors, *self.bases)
