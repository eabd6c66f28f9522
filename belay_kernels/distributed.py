"""Averaging across processes: FSDP2's DTensor shards, and DDP with a sharded shadow.

Both come down to the same picture on each rank: a list of local tensors (FSDP2's local
shards, or this rank's dim-0 chunk of each DDP parameter), a shadow for exactly those
elements in one flat local buffer, and for every parameter a :class:`Spec` saying where
its local piece sits in the full tensor (a device mesh, DTensor placements, the global
shape). ``step()`` runs the ordinary ops on the local lists: no collective and no DTensor
dispatch. Only checkpoints (DTensors built from the local views, so
``torch.distributed.checkpoint`` reshards them), evaluation of a sharded DDP shadow
(all-gathered) and :func:`export_averaged` see whole tensors.

The sharded DDP shadow chunks every parameter along dim 0 as ``torch.chunk`` does, which
is exactly DTensor's ``Shard(0)`` over a 1-D mesh of the process group, and also how
FSDP2 shards: so its checkpoint is keyed by the parameters' names and reshards like any
DTensor state, and each rank's chunk is a contiguous piece of the parameter.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import BelayInputError


def _dtensor_class():
    """DTensor's class, or None when torch.distributed.tensor was never imported (then no
    DTensor exists, and importing it would cost every single-process user time)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


@dataclass(frozen=True)
class Spec:
    """Where one tensor's local piece sits in the full tensor."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple

    @classmethod
    def of(cls, t) -> Spec:
        return cls(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()))

    def wrap(self, local: torch.Tensor):
        """A DTensor over ``local`` (a view, no copy, no communication)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor, gathered from every rank's piece (a collective)."""
        with torch.no_grad():
            return self.wrap(local).full_tensor()

    def same_layout(self, t) -> bool:
        return (
            is_dtensor(t)
            and t.device_mesh == self.mesh
            and tuple(t.placements) == self.placements
            and t.shape == self.shape
        )

    def local_of(self, value: torch.Tensor) -> torch.Tensor:
        """This rank's piece of ``value``: a DTensor laid out like this spec, or a plain
        tensor holding the full value (cut locally, no communication)."""
        if self.same_layout(value):
            return value.to_local()
        if is_dtensor(value):
            return value.redistribute(self.mesh, self.placements).to_local()
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            value, self.mesh, list(self.placements), src_data_rank=None
        ).to_local()

    def offsets(self) -> tuple[int, ...]:
        """Where this rank's piece starts in the full tensor, per dimension."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        return tuple(
            compute_local_shape_and_global_offset(self.shape, self.mesh, self.placements)[1]
        )

    def counts_here(self) -> bool:
        """Whether this rank's piece is the first copy of it: on each mesh dimension the
        tensor is replicated over, this rank has coordinate 0."""
        coordinate = self.mesh.get_coordinate()
        return all(c == 0 for c, p in zip(coordinate, self.placements) if p.is_replicate())

    def describe(self) -> str:
        return f"{tuple(self.shape)} on mesh {tuple(self.mesh.shape)} as {list(self.placements)}"


# ---- building the local lists -------------------------------------------------------


def split_dtensors(named):
    """(DTensor pairs, other pairs) of ``named``."""
    if _dtensor_class() is None:
        return [], list(named)
    dtensors = [(n, t) for n, t in named if is_dtensor(t)]
    others = [(n, t) for n, t in named if not is_dtensor(t)]
    return dtensors, others


def local_groups(named_dtensors):
    """DTensor parameters grouped by their local shards' (device, dtype):
    yields (names, parameters, local shards, specs)."""
    groups: dict[tuple, list] = {}
    for name, p in named_dtensors:
        local = p._local_tensor
        groups.setdefault((local.device, local.dtype), []).append((name, p, local))
    for members in groups.values():
        yield (
            [n for n, _, _ in members],
            [p for _, p, _ in members],
            [t for _, _, t in members],
            [Spec.of(p) for _, p, _ in members],
        )


def flat_copy(tensors: list[torch.Tensor], dtype: torch.dtype):
    """One buffer of ``dtype`` holding copies of ``tensors``, and a view per tensor."""
    device = tensors[0].device
    storage = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    views, offset = [], 0
    with torch.no_grad():
        for t in tensors:
            view = storage[offset : offset + t.numel()].view(t.shape)
            view.copy_(t.detach())
            views.append(view)
            offset += t.numel()
    return storage, views


def refresh_local_shards(names, params, shadows) -> list[torch.Tensor]:
    """Each DTensor parameter's current local shard. FSDP2 may give a parameter a new
    local tensor object (lazy init re-pads empty shards); what matters is that each
    shard still has its shadow's shape."""
    locals_ = [p._local_tensor for p in params]
    bad = [
        f"{n}: local shard {tuple(t.shape)}, shadow {tuple(s.shape)}"
        for n, t, s in zip(names, locals_, shadows)
        if t.shape != s.shape
    ]
    if bad:
        raise BelayInputError(
            "the model's local shards no longer match the averager's shadow ("
            + "; ".join(bad[:5])
            + "): the model was resharded. Build the averager after the final fully_shard, "
            "and move its state between shardings with torch.distributed.checkpoint."
        )
    return locals_


def default_group_mesh(process_group=None):
    """The 1-D device mesh of ``process_group`` (default: the world), on this rank's
    device type. Refuses when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise BelayInputError(
            "shard_shadow=True splits the shadow across the ranks of a process group, but "
            "torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the "
            "environment), or drop shard_shadow=True."
        )
    from torch.distributed.device_mesh import DeviceMesh

    group = process_group or dist.group.WORLD
    backend = dist.get_backend(group)
    device_type = "cuda" if backend == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device_type)


def chunk_rows(names, full: list[torch.Tensor], mesh):
    """This rank's dim-0 chunk of each tensor (``torch.chunk``'s split, DTensor's
    ``Shard(0)``), views of ``full``; 0-d tensors are kept whole on every rank."""
    from torch.distributed.tensor import Replicate, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    chunks, specs = [], []
    for t in full:
        t = t.detach()
        stride = tuple(t.stride()) if t.is_contiguous() else _contiguous_stride(t.shape)
        if t.dim() == 0:
            chunks.append(t)
            specs.append(Spec(mesh, (Replicate(),), t.shape, stride))
            continue
        chunks.append(t.narrow(0, *row_chunk(t.shape[0], rank, world)))
        specs.append(Spec(mesh, (Shard(0),), t.shape, stride))
    return chunks, specs


def row_chunk(rows: int, rank: int, world: int) -> tuple[int, int]:
    """(first row, number of rows) of ``rank``'s chunk of ``rows`` rows: torch.chunk's split."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, max(0, min(size, rows - start))


def row_spec(shape, mesh) -> Spec:
    """DTensor's ``Shard(0)`` over a 1-D ``mesh`` (``Replicate`` for a 0-d tensor)."""
    from torch.distributed.tensor import Replicate, Shard

    placement = Replicate() if len(shape) == 0 else Shard(0)
    return Spec(mesh, (placement,), torch.Size(shape), _contiguous_stride(shape))


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


# ---- the model the averager was built on -------------------------------------------


class Binding:
    """The module attribute each averaged tensor was found under, to notice when the
    model's parameters are replaced after the averager was built (``fully_shard`` does
    that: it swaps every parameter for a DTensor shard)."""

    def __init__(self, module: nn.Module, names: list[str], tensors: list[torch.Tensor]):
        self._module = module
        self._entries = []
        for name, t in zip(names, tensors):
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            table = owner._parameters if attr in owner._parameters else owner._buffers
            self._entries.append((name, table, attr, t))
        self._fsdp_modules = _fsdp_modules(module)

    def tables_and_keys(self, names: list[str]) -> tuple[list[dict], list[str]]:
        """For each of ``names``, the dict its module keeps it in and its key there."""
        where = {name: (table, attr) for name, table, attr, _ in self._entries}
        return [where[n][0] for n in names], [where[n][1] for n in names]

    def reshard(self) -> None:
        """Put every FSDP2 module back in its sharded state, so the module's attributes
        are the sharded parameters again and the next forward all-gathers the shards.
        (The root stays unsharded after a forward without backward.)"""
        for m in self._fsdp_modules:
            m.reshard()

    def check(self) -> None:
        self.reshard()
        replaced = [
            (name, table.get(attr))
            for name, table, attr, t in self._entries
            if table.get(attr) is not t
        ]
        if not replaced:
            return
        shown = ", ".join(n for n, _ in replaced[:5]) + (
            f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        )
        sharded_since = not self._fsdp_modules and (
            is_dtensor(replaced[0][1]) or _fsdp_modules(self._module)
        )
        if sharded_since:
            why = (
                "fully_shard replaced them with DTensor shards: the averager was built before "
                "fully_shard. Build it after fully_shard (as you would the optimizer), so that "
                "it averages each rank's own shards."
            )
        else:
            why = (
                "the module holds other tensor objects under those names now (a "
                "parameter was reassigned, or load_state_dict(assign=True)). Build the "
                "averager after the model is in its final form."
            )
        raise BelayInputError(
            f"the model's tensors {shown} are not the ones the averager was built on: {why}"
        )


def _fsdp_modules(module: nn.Module) -> list:
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


# ---- ops on DTensors ------------------------------------------------------------------


def local_args(names, args):
    """The ops' arguments with DTensors replaced by their local shards, after checking
    that each row's DTensors share one mesh, placements and shape (and a list, one mesh).
    Arguments without DTensors come back unchanged."""
    if _dtensor_class() is None:
        return args
    if all(isinstance(a, torch.Tensor) for a in args):
        return list(_local_row(names, args))
    if not any(isinstance(a, (list, tuple)) and any(is_dtensor(t) for t in a) for a in args):
        return args
    lists = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
    if not all(isinstance(a, list) for a in lists) or len({len(a) for a in lists}) != 1:
        return args  # the ops' own checks explain the shape of the arguments
    rows = [_local_row([f"{n}[{i}]" for n in names], row) for i, row in enumerate(zip(*lists))]
    meshes = [(i, t.device_mesh) for i, t in enumerate(lists[0]) if is_dtensor(t)]
    for i, mesh in meshes:
        if mesh != meshes[0][1]:
            raise BelayInputError(
                f"one call covers one device mesh, but {names[0]}[{meshes[0][0]}] is on "
                f"{meshes[0][1]} and {names[0]}[{i}] on {mesh}. Call once per mesh."
            )
    return [list(column) for column in zip(*rows)] if rows else args


def _local_row(names, row):
    flags = [is_dtensor(t) for t in row]
    if not any(flags):
        return tuple(row)
    if not all(flags):
        plain = names[flags.index(False)]
        dt = names[flags.index(True)]
        raise BelayInputError(
            f"{dt} is a DTensor but {plain} is a plain tensor; pass both as DTensors with "
            "the same placements, or both as local tensors (DTensor.to_local())."
        )
    first = Spec.of(row[0])
    for name, t in zip(names[1:], row[1:]):
        if not first.same_layout(t):
            raise BelayInputError(
                f"{name} is laid out as {Spec.of(t).describe()} but {names[0]} as "
                f"{first.describe()}; the update is element by element, so both must be "
                "sharded alike (same device mesh, placements and shape)."
            )
    return tuple(t._local_tensor for t in row)


# ---- collectives at the edges: counters, export ------------------------------------------


def global_count(count: int) -> int:
    """Sum of ``count`` over every rank of the default group (a collective); ``count``
    itself when torch.distributed is not initialised (a checkpoint loaded on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return count
    total = torch.tensor([count], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return int(total.item())


def is_first_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def export_averaged(averager, path=None, *, rank: int = 0, dtype: torch.dtype | None = None):
    """The full averaged weights as a plain ``model.state_dict()``-shaped dict of whole
    tensors (gathered from every rank's shards; every rank must call this), written with
    ``torch.save`` to ``path`` on ``rank`` when a path is given. Loadable with
    ``model.load_state_dict(torch.load(path))`` on a single process, no torch.distributed.

    Tensors that are not averaged (integer buffers, or buffers with ``buffers="copy"``)
    come from the live model. ``dtype=None`` stores each tensor in the model's dtype;
    pass e.g. ``torch.float32`` to keep an fp32 shadow's precision."""
    module = averager._module
    if module is None:
        raise BelayInputError(
            "export_averaged needs the averager to be built on an nn.Module (it writes a "
            "model.state_dict()-shaped file); this one was built on a list of tensors."
        )
    averager._check_ready("export_averaged()")
    averaged = dict(zip(averager.names(), averager._full_averaged_values()))
    aliases = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        aliases.setdefault(id(t), []).append(name)
    by_alias = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name in averaged:
            for alias in aliases.get(id(t), [name]):
                by_alias[alias] = averaged[name]
    out = {}
    with torch.no_grad():
        for key, live in module.state_dict().items():
            value = by_alias.get(key)
            if value is None:
                value = live.full_tensor() if is_dtensor(live) else live
            target_dtype = dtype or live.dtype
            if value.is_floating_point():
                value = value.to(target_dtype)
            out[key] = value.detach().cpu().clone()
    if path is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == rank:
            torch.save(out, path)
    return out


def state_like(target: dict, source: dict) -> dict:
    """``source`` (a state dict) with each DTensor gathered whole where ``target`` holds a
    plain tensor under that key (a collective then)."""
    return {
        k: v.full_tensor() if is_dtensor(v) and not is_dtensor(target.get(k)) else v
        for k, v in source.items()
    }


# ---- checkpoints ----------------------------------------------------------------------


def check_checkpoint(averager, checkpoint_id, key: str) -> None:
    """Compare the averager's tensors with those in a torch.distributed.checkpoint
    directory (under ``key``, as saved with ``dcp.save({key: averager, ...})``) and raise,
    naming the differing tensors and shapes, before anything is loaded."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint_id).read_metadata()
    saved = {
        fqn[len(key) + 1 :]: tuple(md.size)
        for fqn, md in metadata.state_dict_metadata.items()
        if fqn.startswith(key + ".") and hasattr(md, "size")
    }
    mine = {}
    for kind, tensors in averager._saved_tensors().items():
        for name, t, spec in zip(averager.names(), tensors, averager._specs_in_order()):
            mine[f"{kind}.{name}"] = tuple(spec.shape if spec is not None else t.shape)
    missing = [f"{k} {v}" for k, v in mine.items() if k not in saved]
    unexpected = [f"{k} {v}" for k, v in saved.items() if k not in mine]
    differ = [
        f"{k}: saved {saved[k]}, here {v}" for k, v in mine.items() if k in saved and saved[k] != v
    ]
    problems = [
        f"{label} {', '.join(items[:5])}"
        + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        for label, items in (
            ("missing:", missing),
            ("unexpected:", unexpected),
            ("shapes differ:", differ),
        )
        if items
    ]
    if problems:
        raise BelayInputError(
            f"the checkpoint {checkpoint_id!s} under {key!r} does not fit this "
            f"{averager.method} averager (was it saved from a different model?): "
            + "; ".join(problems)
        )
