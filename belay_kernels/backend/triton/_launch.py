"""Host side of every launcher: block size, dtype mapping, scalar encoding, grids and
the pointer table of the tensor-list variants."""

from __future__ import annotations

import contextlib
import struct
import weakref

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
# belay_kernels.backend.triton.measure reports the bandwidth it achieves.
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


def odd_words(bits: int) -> tuple[int, int]:
    """float_bits split into two odd 37-bit words (decoded by _blocks._odd_words_bits).
    Triton specializes the ints inside a tuple argument on ``== 1`` and on divisibility by
    16 whatever do_not_specialize says, so a rate passed there as plain bits would compile
    anew whenever its low bits change; odd words above 2**36 never trigger either."""
    unsigned = bits & 0xFFFFFFFFFFFFFFFF
    return tuple((1 << 36) | ((word & 0xFFFFFFFF) << 1) | 1 for word in (unsigned >> 32, unsigned))


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


def on_device(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current device and its
    current stream, which need not be the tensors' (tensors on cuda:1 while cuda:0 is
    current, as with device_map="auto"). A no-op when it already is current."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(
    kernel, columns, args, flags, owners=None, tuple_columns: int = 0, row_scalars=()
) -> None:
    """One launch of a kernel written for both forms (``IS_LIST``): ``columns`` are tensors
    (one program per block of them; nothing for empty ones) or lists of tensors (one
    launch over every block of every tensor, two where some tensors, or their first few
    elements, are not 16-byte aligned). The kernel takes (table, owner, size, one pointer
    per column, ``args``...): in the flat form the first column stands in for the table
    and owner, and size is its numel. ``tuple_columns``: how many leading columns travel
    as one tuple argument (the multi-EMA's K shadows). ``owners``: the tensors whose
    lifetime the pointer tables follow, when ``columns`` holds temporary views of them
    (default: ``columns``). ``row_scalars``: per-tensor one-element tensors (the
    optimizer's step counts), one tensor or list per scalar, passed as one pointer each
    after the columns' pointers; every program of a row reads that row's element (see
    PointerTable)."""

    def pointers(columns):
        columns = tuple(columns)
        if tuple_columns:
            return (columns[:tuple_columns], *columns[tuple_columns:])
        return columns

    if isinstance(columns[0], torch.Tensor):
        n = columns[0].numel()
        if n:
            with on_device(columns[0].device):
                kernel[grid(n, flags["BLOCK"])](
                    columns[0],
                    columns[0],
                    n,
                    *pointers(columns),
                    *row_scalars,
                    *args,
                    IS_LIST=False,
                    ALIGNED=True,
                    **flags,
                )
        return
    owners = owners if owners is not None else columns
    tables = PointerTable.of(columns, [*owners, *row_scalars], row_scalars)
    with on_device(columns[0][0].device):
        for table in tables:
            kernel[(table.num_blocks,)](
                table.table,
                table.owner,
                table.num_tensors,
                *pointers(table.bases),
                *table.scalar_bases,
                *args,
                IS_LIST=True,
                ALIGNED=table.aligned,
                **flags,
            )


def scalar_args(value, device: torch.device, one_minus: bool = False) -> tuple[int, object, bool]:
    """(host bits, device tensor or None, FROM_PTR) for a rate given either way. A tensor
    the kernel cannot read (a CPU scalar next to CUDA tensors; ops refuses other devices)
    is read here, as the number it holds."""
    if isinstance(value, torch.Tensor) and value.device == device:
        return 0, value, True
    value = float(value)
    return float_bits(1.0 - value if one_minus else value), None, False


def rate_args(value, placeholder: torch.Tensor, one_minus: bool = False):
    """A rate's kernel arguments (host bits, device pointer or ``placeholder``) and its
    FROM_PTR flag; see scalar_args."""
    bits, pointer, from_ptr = scalar_args(value, placeholder.device, one_minus)
    return (bits, placeholder if pointer is None else pointer), from_ptr


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _address(t: torch.Tensor, element: int) -> int:
    return t.data_ptr() + element * t.element_size()


def _aligned_pieces(row: list[torch.Tensor]) -> tuple[list, list]:
    """One tensor row (its tensor in every column) as (aligned, misaligned) ranges of
    (first element, elements): a scalar head up to the first element where every column
    is 16-byte aligned, then the rest as one aligned range, as the CUDA kernel does; all
    misaligned where no element aligns every column (tensors misaligned differently)."""
    n = row[0].numel()
    head = next((h for h in range(min(n, 16)) if all(_address(t, h) % 16 == 0 for t in row)), None)
    if head is None:
        return [], [(0, n)]
    return [(head, n - head)], ([(0, head)] if head else [])


class PointerTable:
    """The device table one tensor-list launch reads (layout in _blocks): per column the
    element offsets of the pieces from the table's own address (the table doubles as every
    column's base pointer, so it holds no reference to the tensors), the sizes, the first
    blocks, and every block's owner. A piece is a tensor or a range of one.

    A table lives exactly as long as the tensors it points into: it is built once per
    list of tensors (same addresses, sizes, dtypes) and dropped when the first of those
    tensor objects is freed, never before, so a CUDA graph that captured a launch can
    replay it for as long as its tensors exist. Each tensor is aligned on its own: the
    pieces that are 16-byte aligned in every column (whole tensors, or what follows a
    tensor's scalar head) go in one table launched with 128-bit accesses, the heads and
    tensors that never align in a second. Building allocates and copies from the host,
    which a CUDA graph capture forbids: run one step before capturing.

    ``row_scalars``: lists of one-element tensors, one per row (tensor index), stored
    after the first blocks as each piece's offset to its row's element: a piece that is
    only part of a tensor still reads that tensor's scalar, which takes no part in the
    alignment of the pieces."""

    _tables: dict = {}

    def __init__(
        self,
        columns: list[list[torch.Tensor]],
        pieces: list[tuple[int, int, int]],
        aligned: bool,
        row_scalars=(),
    ):
        self.block = block_size(*(column[0].dtype for column in columns))
        sizes = [length for _, _, length in pieces]
        blocks = [triton.cdiv(n, self.block) for n in sizes]
        first = [0]
        for b in blocks[:-1]:
            first.append(first[-1] + b)
        device = columns[0][0].device
        rows = len(columns) + 2 + len(row_scalars)
        self.table = torch.empty(rows * len(pieces), dtype=torch.int64, device=device)
        offsets = [self._offset(column[i], start) for column in columns for i, start, _ in pieces]
        scalar_offsets = [
            self._offset(column[i], 0) for column in row_scalars for i, _, _ in pieces
        ]
        self.table.copy_(torch.tensor(offsets + sizes + first + scalar_offsets, dtype=torch.int64))
        self.bases = [self.table.view(column[0].dtype) for column in columns]
        self.scalar_bases = [self.table.view(column[0].dtype) for column in row_scalars]
        owners = torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64)
        )
        self.owner = owners.to(device)
        self.num_tensors = len(sizes)
        self.num_blocks = sum(blocks)
        self.aligned = aligned

    def _offset(self, t: torch.Tensor, element: int) -> int:
        """Element ``element`` of ``t`` as an offset from the table, in t's elements."""
        size = t.element_size()
        distance = _address(t, element) - self.table.data_ptr()
        if distance % size:  # never for a tensor of this dtype's own storage
            raise ValueError(f"a tensor's address is not a multiple of {size} bytes")
        return distance // size

    @classmethod
    def of(cls, columns: list[list[torch.Tensor]], owners, row_scalars=()) -> list[PointerTable]:
        """The tables for ``columns`` (and ``row_scalars``), built on first use (refused
        during a capture); ``owners`` are the tensor objects whose lifetime the tables
        follow."""
        key = tuple(
            (t.data_ptr(), t.numel(), t.dtype, t.device)
            for c in (*columns, *row_scalars)
            for t in c
        )
        if row_scalars:  # the same tensors without the scalars have a table of other rows
            key += (len(row_scalars),)
        tables = cls._tables.get(key)
        if tables is None:
            if _capturing(columns[0][0].device):
                from ..._checks import BelayInputError

                raise BelayInputError(
                    "a tensor-list launch needs a pointer table for these tensors, and "
                    "building one (an allocation and a host-to-device copy) is not allowed "
                    "while a CUDA graph is being captured. Run the same call once before "
                    "the capture, with the same tensors, so the table exists."
                )
            tables = cls._build(columns, row_scalars)
            cls._tables[key] = tables
            for t in {id(t): t for c in owners for t in c}.values():
                weakref.finalize(t, cls._forget, key, tables)
        return tables

    @classmethod
    def _forget(cls, key, tables) -> None:
        if cls._tables.get(key) is tables:
            del cls._tables[key]

    @classmethod
    def _build(cls, columns, row_scalars=()) -> list[PointerTable]:
        aligned, misaligned = [], []
        for i in range(len(columns[0])):
            if columns[0][i].numel():
                good, bad = _aligned_pieces([c[i] for c in columns])
                aligned += [(i, start, n) for start, n in good]
                misaligned += [(i, start, n) for start, n in bad]
        return [
            cls(columns, pieces, flag, row_scalars)
            for pieces, flag in ((aligned, True), (misaligned, False))
            if pieces
        ]
