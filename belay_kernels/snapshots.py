"""PostHocEMA's snapshots on disk: their two layouts, their checksums, the thread that
writes them, and reading them back.

**Layouts.**

- A file, ``snapshot-NNNNNN.pt`` (one process, or rank 0 under DDP): ``torch.save`` of
  a dict holding the header and the K profiles as whole tensors.
- A folder, ``snapshot-NNNNNN/`` (FSDP2): a ``torch.distributed.checkpoint`` (DCP)
  checkpoint to which every rank wrote its own shards, laid out as the parameters'
  DTensors are, and ``header.json``. DCP reads it back on any number of ranks.

**Crash safety.** A snapshot is written under a hidden name (``.snapshot-NNNNNN.pt.<pid>.tmp``
or the folder ``.snapshot-NNNNNN.partial``) and renamed to its own name as the last
step of the write. So a snapshot under its own name is complete, and a write killed
half-way leaves only a hidden leftover: the next write removes it, and
:func:`belay_kernels.posthoc.reconstruct` names it (:class:`IncompleteSnapshotWarning`).

**Checksums.** Each saved tensor carries ``sum(bits[i] * (2 i + 1)) mod 2**64`` over its
elements: ``bits[i]`` is element i's bit pattern as an unsigned integer, i its row-major
index in the whole tensor. Changing any one element (one flipped bit, say) changes the
sum, because ``2 i + 1`` is odd. The sum is linear, so ranks holding pieces of a tensor
sum their parts: a snapshot written as shards by N ranks is verified by M ranks, or by
one process, each reading only what it holds. The writer thread computes it from the
staged copy, so the training thread never pays for it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ._checks import BelayInputError

KIND = "belay_kernels.posthoc snapshot"
# 1: no checksums (still read); 2: checksums, and the folder layout
FORMAT = 2
READABLE_FORMATS = (1, 2)
HEADER_FILE = "header.json"
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_CHUNK = 1 << 16  # elements summed per numpy call: its temporaries stay in L2


class IncompleteSnapshotWarning(UserWarning):
    """A snapshot folder holds the leftover of a write that did not finish."""


class SnapshotWriteError(RuntimeError):
    """A snapshot write, run on the writer thread, failed."""


def file_name(index: int) -> str:
    return f"snapshot-{index:06d}.pt"


def folder_name(index: int) -> str:
    return f"snapshot-{index:06d}"


def index_of(path: Path) -> int | None:
    """The index of a snapshot under its own name (a file ending in .pt, or a folder),
    or None for any other name."""
    stem = path.name if path.is_dir() else path.name.removesuffix(".pt")
    if stem == path.name and not path.is_dir():
        return None
    number = stem.removeprefix("snapshot-")
    if number == stem or len(number) != 6 or not number.isdigit():
        return None
    return int(number)


# ---- checksums --------------------------------------------------------------------------
def checksum(piece: torch.Tensor, shape, offsets=None) -> int:
    """The checksum's part over ``piece``, which sits at ``offsets`` (per dimension, default
    0) in a tensor of ``shape``: ``sum(bits[i] * (2 i + 1)) mod 2**64`` over the elements it
    holds, i their row-major indices in the whole tensor."""
    t = piece.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return 0
    shape, offsets = tuple(shape), tuple(offsets or (0,) * len(tuple(shape)))
    bits = t.reshape(-1).view(torch.uint8).numpy().view(_UNSIGNED[t.element_size()])
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if t.dim() == 0 or tuple(t.shape[1:]) == shape[1:]:
        # whole rows: the piece is one run of consecutive indices
        start = offsets[0] * strides[0] if shape else 0
        return _weighted_run(bits, start)
    # a piece cut in an inner dimension too: its rows are runs, each of its own start
    row = int(np.prod(t.shape[1:]))
    inner = np.zeros(t.shape[1:], dtype=np.int64)
    for d in range(1, t.dim()):
        axis = (np.arange(t.shape[d], dtype=np.int64) + offsets[d]) * strides[d]
        inner = inner + axis.reshape([-1 if e == d - 1 else 1 for e in range(t.dim() - 1)])
    inner = inner.reshape(-1).astype(np.uint64)
    total = 0
    for r in range(t.shape[0]):
        b = bits[r * row : (r + 1) * row].astype(np.uint64)
        start = (offsets[0] + r) * strides[0]
        weights = (inner + np.uint64(start)) * np.uint64(2) + np.uint64(1)
        total += int(np.sum(b * weights, dtype=np.uint64))
    return total % (1 << 64)


_EVEN = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(2)


def _weighted_run(bits: np.ndarray, start: int) -> int:
    """``sum(bits[j] * (2 (start + j) + 1)) mod 2**64``, split as
    ``(2 start + 1) sum(bits) + sum(2 j bits[j])`` per chunk (numpy wraps uint64 modulo 2**64)."""
    total = 0
    for a in range(0, bits.size, _CHUNK):
        b = bits[a : a + _CHUNK].astype(np.uint64)
        plain = int(np.sum(b, dtype=np.uint64))
        ramp = int(np.sum(b * _EVEN[: b.size], dtype=np.uint64))
        total += (2 * (start + a) + 1) * plain + ramp
    return total % (1 << 64)


def combine(parts) -> int:
    """The checksum of a tensor from its pieces' parts."""
    return sum(parts) % (1 << 64)


# ---- the writer -------------------------------------------------------------------------
class SnapshotWriter:
    """Runs one snapshot write at a time, on a thread of its own (``background``) or in
    the caller. A new write first waits for the one in flight; a failed write raises
    :class:`SnapshotWriteError` at the next :meth:`submit`, :meth:`raise_failure` or
    :meth:`wait`, once."""

    def __init__(self, background: bool):
        self.background = bool(background)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._what = ""

    def submit(self, what: str, write: Callable[[], None]) -> None:
        self.wait()
        if not self.background:
            self._pending, self._what = _run_now(write), what
            self.wait()
            return
        if self._executor is None:  # made on first use: the thread exists only if needed
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="belay-snapshots")
        self._pending, self._what = self._executor.submit(write), what

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def raise_failure(self) -> None:
        """Raise if a finished write failed; never waits."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        exc = pending.exception()
        if exc is not None:
            raise SnapshotWriteError(
                f"writing {self._what} failed ({type(exc).__name__}: {exc}); that snapshot "
                "is missing, the others are intact. Fix the cause (disk space, permissions), "
                "and training can go on: the next snapshot is written as usual."
            ) from exc


def _run_now(write) -> Future:
    done: Future = Future()
    try:
        write()
        done.set_result(None)
    except Exception as exc:  # reported through the future, as a thread's failure is
        done.set_exception(exc)
    return done


# ---- writing ----------------------------------------------------------------------------
def remove_leftovers(folder: Path) -> None:
    """Delete the hidden temporaries of writes that did not finish (a killed run's). A
    snapshot under its own name is never deleted, not even an incomplete folder: only a
    copy made by hand can leave one, and reconstruct() names it."""
    for path in _leftovers(folder):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _leftovers(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob(".snapshot-*.tmp")) + sorted(folder.glob(".snapshot-*.partial"))


def incomplete(folder: Path) -> list[Path]:
    """What reconstruct() skips: leftovers of writes that did not finish, and snapshot
    folders missing a part."""
    found = _leftovers(folder)
    for path in sorted(folder.glob("snapshot-*")) if folder.is_dir() else []:
        if path.is_dir() and index_of(path) is not None and not _folder_complete(path):
            found.append(path)
    return found


def _folder_complete(path: Path) -> bool:
    return (path / HEADER_FILE).is_file() and (path / ".metadata").is_file()


def write_file(folder: Path, index: int, header: dict, profiles, buffers: dict) -> None:
    """The file layout: checksums of the staged tensors, then ``torch.save`` to a hidden
    temporary, fsync, and the rename that completes it."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    sums = {
        "profiles": [[checksum(v, v.shape) for v in profile] for profile in profiles],
        "buffers": {n: checksum(b, b.shape) for n, b in buffers.items()},
    }
    payload = {**header, "checksums": sums, "profiles": profiles, "buffers": buffers}
    atomic_save(payload, folder / file_name(index))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then a rename: a crash leaves
    the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_folder(folder: Path, index: int, header: dict, pieces, buffers: dict, group) -> None:
    """The folder layout, on every rank of ``group`` at once (it is collective): each rank
    saves its shards with DCP into the hidden folder, the ranks' checksum parts are summed,
    and rank 0 writes ``header.json`` and renames the folder. ``pieces[k]`` lists profile
    k's tensors as (name, local piece, its DTensor spec or None for a whole tensor that
    every rank holds). Whole tensors and the buffers are saved from rank 0 alone: the
    ranks' copies may differ (buffers that a forward updates from each rank's batch), and
    then the snapshot holds rank 0's, as under DDP."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    partial = folder / f".{folder_name(index)}.partial"
    first = dist.get_rank(group) == 0
    if first:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)
        partial.mkdir()
    dist.barrier(group)  # the folder exists before any rank writes into it
    parts = [
        [_piece_checksum(piece, spec, first) for _, piece, spec in profile] for profile in pieces
    ]
    parts.append([checksum(b, b.shape) if first else 0 for b in buffers.values()])
    state = {
        f"profile_{k}": {
            name: spec.wrap(p) if spec is not None else p
            for name, p, spec in profile
            if spec is not None or first
        }
        for k, profile in enumerate(pieces)
    }
    state["buffers"] = dict(buffers) if first else {}
    dcp.save(state, checkpoint_id=str(partial), process_group=group)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, parts, group=group)
    if first:
        summed = [
            [combine(rank_parts[k][j] for rank_parts in gathered) for j in range(len(parts[k]))]
            for k in range(len(parts))
        ]
        sums = {"profiles": summed[:-1], "buffers": dict(zip(buffers, summed[-1]))}
        header = {
            **header,
            "checksums": sums,
            "buffer_shapes": {n: list(b.shape) for n, b in buffers.items()},
            "buffer_dtypes": {n: str(b.dtype).removeprefix("torch.") for n, b in buffers.items()},
            "ranks": dist.get_world_size(group),
        }
        with open(partial / HEADER_FILE, "w") as f:
            json.dump(header, f)
            f.flush()
            os.fsync(f.fileno())
        final = folder / folder_name(index)
        if final.exists():  # a later run's snapshot of the same number: replaced
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_folder(folder)
    dist.barrier(group)  # wait() returns on every rank once the snapshot is complete


def _piece_checksum(piece: torch.Tensor, spec, first: bool) -> int:
    """This rank's part: its piece of a sharded tensor, or for a tensor every rank holds
    (a replicated piece) only the first holder's (rank 0 of the writing group: ``first``)."""
    if spec is None:
        return checksum(piece, piece.shape) if first else 0
    return checksum(piece, spec.shape, spec.offsets()) if spec.counts_here() else 0


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------
HEADER_KEYS = ("kind", "format", "index", "step", "gammas", "names", "shapes", "is_param")


def complete(folder) -> list[Path]:
    """The complete snapshots in ``folder`` (files and folders), by index."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("snapshot-*"):
        index = index_of(path)
        if index is None or (path.is_dir() and not _folder_complete(path)):
            continue
        found.append((index, path))
    return [p for _, p in sorted(found)]


def warn_incomplete(folder) -> list[Path]:
    skipped = incomplete(Path(folder))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} incomplete snapshot(s) in {str(folder)!r}: "
            f"{', '.join(p.name for p in skipped[:5])}"
            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            + ". A write did not finish (a killed run), so they are not used; the next "
            "PostHocEMA write in this folder removes them.",
            IncompleteSnapshotWarning,
            stacklevel=3,
        )
    return skipped


def _check_header(snap, path, keys=HEADER_KEYS) -> dict:
    if not isinstance(snap, dict) or snap.get("kind") != KIND:
        raise BelayInputError(f"{str(path)!r} is not a PostHocEMA snapshot.")
    missing = [k for k in keys if k not in snap]
    if snap.get("format") == FORMAT and "checksums" not in snap:
        missing.append("checksums")
    if missing or snap["format"] not in READABLE_FORMATS:
        raise BelayInputError(
            f"snapshot {str(path)!r} lacks {missing} or has format {snap.get('format')!r} "
            f"(expected one of {list(READABLE_FORMATS)}); it is corrupt or from another version."
        )
    return snap


def read_file(path, *, mmap: bool = False) -> dict:
    """One snapshot file, its header checked; ``mmap=True`` maps its tensors without reading them."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several kinds for a damaged zip
        raise BelayInputError(
            f"snapshot {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt. Delete it (the others still reconstruct) or restore it."
        ) from None
    return _check_header(snap, path, HEADER_KEYS + ("profiles", "buffers"))


def read_folder_header(path) -> dict:
    try:
        with open(Path(path) / HEADER_FILE) as f:
            header = json.load(f)
    except (OSError, ValueError) as exc:
        raise BelayInputError(
            f"snapshot {str(path)!r} has no readable {HEADER_FILE} ({type(exc).__name__}: "
            f"{exc}); it is damaged. Delete it (the others still reconstruct) or restore it."
        ) from None
    return _check_header(header, path)


def damaged(path, what: str) -> BelayInputError:
    return BelayInputError(
        f"snapshot {str(path)!r} is damaged: the checksum of {what} does not match what was "
        "written (the data changed on disk or in a copy). Delete it (the others still "
        "reconstruct) or restore it."
    )
