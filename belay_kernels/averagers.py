"""The averagers a training loop holds: EMA, SWA, Belay and TwoPoint.

Each one collects a model's tensors, moves them into flat buffers (one per device and
dtype, see :mod:`belay_kernels.flat`), keeps a shadow laid out like each buffer, checks
them and picks each kernel once (:mod:`belay_kernels.plan`), and on ``step()`` calls one
kernel per buffer. Tensors that cannot be flattened take the tensor-list path: one
multi-tensor kernel call per list, with the same results.

    ema = EMA(model, decay=0.999)
    for batch in loader:
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
    with ema.averaged():      # the shadow swapped into the model, in place
        evaluate(model)
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _backends, distributed, flat, ops
from ._checks import BelayInputError, check_nonfinite
from .bound import BoundTensors
from .hparams import (
    BelayHparams,
    EMAHparams,
    HparamAttribute,
    Hparams,
    SWAHparams,
    TwoPointHparams,
    decay_schedule,
)
from .plan import Launch, checked_rows, launches, roles
from .reference import SWAP_PAIRS, swap_supported
from .schedules import Constant, Warmup, every_k

STATE_FORMAT = 1
BUFFER_POLICIES = ("average", "copy")


class StaleViewsWarning(UserWarning):
    """state_dict() of an averager whose model's tensors were replaced (model.to(...))."""


def default_shadow_dtype(weights_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision weights (a bf16 shadow would stall: its ulp exceeds the
    EMA's per-step change), otherwise the weights' own dtype."""
    return torch.float32 if weights_dtype in (torch.bfloat16, torch.float16) else weights_dtype


TensorOrList = torch.Tensor | list[torch.Tensor]


@dataclass
class Track:
    """What one op call covers (a flat buffer, or a list of tensors on one device), and
    every tensor the averager keeps for it."""

    names: list[str]
    live: list[torch.Tensor]  # the model's tensors, one per name
    weights: TensorOrList  # flat buffer, or the live tensors
    shadow: TensorOrList  # laid out like ``weights``: what the ops take
    shadow_views: list[torch.Tensor]  # ``shadow`` per name, shaped like ``live``
    is_param: bool
    group: flat.FlatGroup | None = None
    # Distributed tracks (see :mod:`belay_kernels.distributed`): where each local piece
    # sits in its full tensor, the one allocation behind ``shadow_views``, whether
    # ``weights`` are FSDP2 local shards (re-read before each use), and for a sharded DDP
    # shadow the whole weights that evaluation swaps with the gathered average.
    specs: list[distributed.Spec] | None = None
    shadow_storage: torch.Tensor | None = None
    dtensor: bool = False
    full_weights: TensorOrList | None = None
    # Laid out like ``shadow``: TwoPoint's average (filled only when evaluating), and
    # PostHocEMA's profiles after the first (the first is ``shadow``).
    average: TensorOrList | None = None
    extra_profiles: list[TensorOrList] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.live[0].device

    def views(self, buffer: TensorOrList) -> list[torch.Tensor]:
        """Per-name views of ``buffer``, which is laid out like ``shadow``."""
        if self.group is None or not isinstance(buffer, torch.Tensor):
            return list(buffer)
        return [self.group.view(buffer, s) for s in self.group.slots]

    def like_shadow(self, make) -> TensorOrList:
        """A new buffer laid out like ``shadow``: ``make`` applied to it, or to each of its tensors."""
        if isinstance(self.shadow, torch.Tensor):
            return make(self.shadow)
        return [make(s) for s in self.shadow]

    def state_tensors(self) -> list[torch.Tensor]:
        """The memory the averager allocated for this track (per-name views of a flat
        buffer, so its alignment padding is not counted)."""
        shadow = [self.shadow_storage] if self.shadow_storage is not None else self.shadow_views
        others = ([] if self.average is None else [self.average]) + self.extra_profiles
        return shadow + [v for buffer in others for v in self.views(buffer)]


def _make_shadow(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weights.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _build_tracks(named, is_param, shadow_dtype_for, flatten, shard_mesh=None) -> list[Track]:
    tracks = []
    dtensors, named = distributed.split_dtensors(named)
    groups, leftovers = flat.flatten(named) if flatten else ([], list(named))
    # this averager's names: a group shared with another averager keeps that one's
    name_of = {id(t): n for n, t in named}
    for group in groups:
        if shard_mesh is not None:
            full = [group.view(group.buffer, s) for s in group.slots]
            names, live = (
                [name_of[id(s.tensor)] for s in group.slots],
                [s.tensor for s in group.slots],
            )
            dtype = shadow_dtype_for(group.buffer.dtype)
            tracks.append(
                _chunk_track(names, live, full, group.buffer, is_param, dtype, shard_mesh, group)
            )
            continue
        shadow = _make_shadow(group.buffer, shadow_dtype_for(group.buffer.dtype))
        tracks.append(
            Track(
                names=[name_of[id(s.tensor)] for s in group.slots],
                live=[s.tensor for s in group.slots],
                weights=group.buffer,
                shadow=shadow,
                shadow_views=[group.view(shadow, s) for s in group.slots],
                is_param=is_param,
                group=group,
            )
        )
    by_device: dict[torch.device, list] = {}
    for name, t in leftovers:
        by_device.setdefault(t.device, []).append((name, t))
    for members in by_device.values():
        live = [t for _, t in members]
        if shard_mesh is not None:
            names, dtype = [n for n, _ in members], shadow_dtype_for(live[0].dtype)
            if len({t.dtype for t in live}) > 1:
                raise BelayInputError(
                    "shard_shadow=True keeps one shadow buffer per dtype; give the "
                    "non-flattenable tensors one dtype, or flatten=True."
                )
            tracks.append(_chunk_track(names, live, live, live, is_param, dtype, shard_mesh))
            continue
        shadows = [_make_shadow(t, shadow_dtype_for(t.dtype)) for t in live]
        tracks.append(Track([n for n, _ in members], live, live, shadows, shadows, is_param))
    for names, params, local_shards, specs in distributed.local_groups(dtensors):
        dtype = shadow_dtype_for(local_shards[0].dtype)
        storage, views = distributed.flat_copy(local_shards, dtype)
        tracks.append(
            Track(
                names,
                params,
                local_shards,
                views,
                views,
                is_param,
                specs=specs,
                shadow_storage=storage,
                dtensor=True,
            )
        )
    return tracks


def _chunk_track(names, live, full, full_weights, is_param, dtype, mesh, group=None) -> Track:
    """A track whose shadow holds only this rank's dim-0 chunk of each tensor."""
    chunks, specs = distributed.chunk_rows(names, full, mesh)
    storage, views = distributed.flat_copy(chunks, dtype)
    return Track(
        names,
        live,
        chunks,
        views,
        views,
        is_param,
        group=group,
        specs=specs,
        shadow_storage=storage,
        full_weights=full_weights,
    )


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper, whose tensors carry their own names
    rather than ``_orig_mod.``-prefixed ones; any other module as it is."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not loaded: nothing compiled
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return module


def _collect(module_or_params, include_frozen: bool, buffers: str):
    """(named params, named floating buffers) to average, tied tensors counted once."""
    if isinstance(module_or_params, nn.Module):
        module = _uncompiled(module_or_params)
        params = list(module.named_parameters())  # removes duplicates (tied weights)
        named_buffers = list(module.named_buffers()) if buffers == "average" else []
    else:
        module = None
        if isinstance(module_or_params, torch.Tensor):
            raise BelayInputError(
                "pass a module or an iterable of parameters, not a single tensor "
                "(wrap it in a list: [tensor])."
            )
        try:
            items = list(module_or_params)
            if not items and iter(module_or_params) is module_or_params:
                raise BelayInputError(
                    f"the iterable was empty; was model.parameters() already consumed? A "
                    f"{type(module_or_params).__name__} can be read only once (an earlier "
                    "averager or optimizer may have read it): pass the model itself, or "
                    "a fresh model.parameters()."
                )
        except TypeError:
            raise BelayInputError(
                f"expected an nn.Module or an iterable of tensors, got "
                f"{type(module_or_params).__name__}."
            ) from None
        seen, params = set(), []
        for i, p in enumerate(items):
            if not isinstance(p, torch.Tensor):
                raise BelayInputError(
                    f"item {i} of the parameters is a {type(p).__name__}, not a tensor "
                    "(param-group dicts are not supported; pass model.parameters())."
                )
            if id(p) not in seen:
                seen.add(id(p))
                params.append((str(i), p))
        named_buffers = []
    params = [
        (n, p) for n, p in params if p.is_floating_point() and (include_frozen or p.requires_grad)
    ]
    named_buffers = [(n, b) for n, b in named_buffers if b.is_floating_point()]
    if not params and not named_buffers:
        raise BelayInputError(
            "there is nothing to average: no floating-point parameters"
            + ("" if include_frozen else " that require grad (include_frozen=False)")
            + "."
        )
    return module, params, named_buffers


class Averager:
    """Shared machinery: flat buffers, shadows, swap, copy and checkpoints.

    Subclasses set ``method`` and, before calling this constructor, ``_hparams`` (a frozen
    :class:`~belay_kernels.hparams.Hparams`); they implement ``_track_ops()``,
    ``_plan_launches()`` and ``_update()``, and allocate any further tensors in
    ``_add_state()``. Where evaluation or checkpoints differ from "the shadow", they
    override ``_eval_buffers()`` (TwoPoint's average, PostHocEMA's selected profile) and
    ``_saved_tensors()``.
    """

    method = "Averager"
    _hparams: Hparams  # set by the subclass before Averager.__init__
    # Whether shard_shadow=True is sound: the update must change the shadow only, since a
    # rank holding a slice of the shadow can update only that slice.
    _can_shard_shadow = True
    # Whether parameters and buffers may share a flat buffer (one launch). Belay keeps
    # them apart: its spring acts on the optimizer's parameters, not on running stats.
    _buffers_join_params = True
    # Whether the default shadow dtype is the weights' own (TwoPoint: its snapshot is exact).
    _shadow_in_weights_dtype = False

    def __init__(
        self,
        module_or_params: nn.Module | Iterable[torch.Tensor],
        *,
        shadow_dtype: torch.dtype | None = None,
        include_frozen: bool = True,
        buffers: str = "average",
        nonfinite: str = "skip",
        backend: str = "auto",
        flatten: bool = True,
        shard_shadow: bool = False,
        process_group=None,
    ):
        if buffers not in BUFFER_POLICIES:
            raise BelayInputError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}.")
        check_nonfinite(nonfinite)
        _backends.check_name(backend)
        if shadow_dtype is not None and shadow_dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
            torch.float64,
        ):
            raise BelayInputError(f"shadow_dtype must be a floating dtype, got {shadow_dtype!r}.")
        shard_mesh = self._shard_mesh(shard_shadow, process_group)
        self._module, params, named_buffers = _collect(module_or_params, include_frozen, buffers)
        if shard_mesh is not None:
            sharded = [n for n, t in params + named_buffers if distributed.is_dtensor(t)]
            if sharded:
                raise BelayInputError(
                    f"shard_shadow=True, but {sharded[:3]} are DTensors (FSDP2 shards): the "
                    "shadow of a sharded model is already sharded like it. Drop shard_shadow."
                )
        self.nonfinite = nonfinite
        self._backend = backend
        shadow_dtype_for = self._shadow_dtype_for = self._shadow_dtype_rule(shadow_dtype)
        self._check_backend(params + named_buffers, named_buffers, shadow_dtype_for)
        if shard_mesh is not None:
            # Buffers stay whole on every rank: DDP keeps only the parameters identical
            # across ranks, and a buffer updated in forward differs between them.
            self._tracks = _build_tracks(
                params, True, shadow_dtype_for, flatten, shard_mesh
            ) + _build_tracks(named_buffers, False, shadow_dtype_for, flatten)
        elif self._buffers_join_params:  # one track kind: every tensor gets the same update
            self._tracks = _build_tracks(params + named_buffers, True, shadow_dtype_for, flatten)
        else:
            self._tracks = _build_tracks(params, True, shadow_dtype_for, flatten) + (
                _build_tracks(named_buffers, False, shadow_dtype_for, flatten)
            )
        self._names = [n for n, _ in params + named_buffers]  # the caller's order
        self._parameters = [t for _, t in params]  # what an optimizer may step (fuse())
        # Set by fuse(): the fused optimizer that steps this averager, and the tensors its
        # kernels update, which this averager's own launches then leave out.
        self._fused_by = None
        self._fused_ids: frozenset[int] = frozenset()
        self._binding = (
            distributed.Binding(self._module, self._names, [t for _, t in params + named_buffers])
            if self._module is not None
            else None
        )
        self._steps = 0  # step() calls so far
        self._updates = 0  # shadow updates so far (SWA: models in the mean)
        self._skipped = {
            t.device: torch.zeros((), dtype=torch.int64, device=t.device) for t in self._tracks
        }
        self._swapped = False
        self._add_state()
        self._plan()

    def _add_state(self) -> None:
        """Subclasses allocate their tensors beyond the shadow here (the tracks exist)."""

    @property
    def nonfinite(self) -> str:
        """'skip' (a non-finite weight leaves its shadow element as it was) or 'propagate'."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, policy: str) -> None:
        self._skip = check_nonfinite(policy)
        self._nonfinite = policy

    @property
    def backend(self) -> str:
        """The backend name the averager was built with ('auto' picks per track)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        _backends.check_name(name)
        before, self._backend = self._backend, name
        try:
            self._plan()
        except BelayInputError:  # a backend that cannot run some track: nothing changes
            self._backend = before
            raise

    def _shadow_dtype_rule(self, shadow_dtype):
        if shadow_dtype is not None:
            return lambda _: shadow_dtype
        return (lambda d: d) if self._shadow_in_weights_dtype else default_shadow_dtype

    def _track_ops(self, weights_dtype, shadow_dtype, is_param) -> list[tuple[str, tuple]]:
        """(op, its tensors' dtypes in argument order) that step() runs on such a track."""
        raise NotImplementedError

    def _check_backend(self, named, named_buffers, shadow_dtype_for) -> None:
        """Refuse, before anything is built or moved, a backend that step() could not run
        on some track (a named backend without a kernel for a dtype pair or layout)."""
        buffer_ids = {id(b) for _, b in named_buffers}
        kinds: dict[tuple, list[str]] = {}
        for name, t in named:
            # A track is a flat buffer (contiguous) or a list of tensors as they are.
            is_param = self._buffers_join_params or id(t) not in buffer_ids
            key = (t.device.type, t.dtype, t.is_contiguous(), is_param)
            kinds.setdefault(key, []).append(name)
        for (device_type, dtype, contiguous, is_param), names in kinds.items():
            shadow_dtype = shadow_dtype_for(dtype)
            for op, dtypes in self._track_ops(dtype, shadow_dtype, is_param):
                try:
                    _backends.resolve(self.backend, op, device_type, dtypes, contiguous)
                except BelayInputError as exc:
                    shown = ", ".join(names[:3]) + (
                        f" and {len(names) - 3} more" if len(names) > 3 else ""
                    )
                    raise BelayInputError(
                        f"step() could not run on the track of {shown} ({dtype} weights, "
                        f"{shadow_dtype} shadow, on {device_type}): {exc}"
                    ) from None

    def _shard_mesh(self, shard_shadow, process_group):
        if not isinstance(shard_shadow, bool):
            raise BelayInputError(f"shard_shadow must be True or False, got {shard_shadow!r}.")
        if not shard_shadow:
            return None
        if not self._can_shard_shadow:
            raise BelayInputError(
                f"{self.method} cannot keep a sharded shadow: its step also moves the weights, "
                "and a rank holding 1/world of the shadow could move only 1/world of them "
                "(the ranks' models would drift apart without an all-gather every step). "
                "Use an unsharded shadow, or FSDP2 (fully_shard), where every rank owns its shards."
            )
        return distributed.default_group_mesh(process_group)

    # ---- the update -------------------------------------------------------------------
    def step(self) -> None:
        """Update the shadow (and for BELAY the weights). Call after ``optimizer.step()``.
        Every check comes before the first write: a refused step changes nothing."""
        if self._fused_by is not None:
            self._refuse_fused_step()
        self._ensure_bound("step()")
        self._advance()

    def wait(self) -> None:
        """Wait for this averager's background work and raise what failed there: a no-op
        here, and for :class:`~belay_kernels.PostHocEMA` the snapshot being written. Trainer
        callbacks call it when training ends."""

    def _refuse_fused_step(self) -> None:
        raise BelayInputError(
            f"this {self.method} is fused with {type(self._fused_by).__name__} (fuse()): the "
            "fused optimizer's step() updates it in the same pass as the weights. Call "
            "optimizer.step() only; a second update here would average twice."
        )

    def _advance(self) -> None:
        """One step: the planned launches, then the counters (and what follows a step)."""
        self._update(self._steps)
        self._steps += 1

    def _average_at(self, t: int) -> tuple[str, tuple]:
        """The update that 0-based step ``t`` makes, as the fused optimizer's kernels take it
        (:mod:`belay_kernels.reference`, ``average_``): ("ema", decays), ("swa", (count,)),
        ("belay" or "poster", (alpha, beta)), or ("none", ()) on a step without one."""
        raise NotImplementedError

    def _update(self, t: int) -> None:
        """Run the planned launches for 0-based step ``t`` (only scalars are computed here)."""
        raise NotImplementedError

    def _plan(self) -> None:
        """Check every track's tensors, choose each launch's kernel, and note the memory the
        model keeps every tensor in, so that a step only has to compare it
        (:mod:`belay_kernels.bound`). Runs when the averager is built, when its state or
        options change, and when that memory changed in a way the full checks allow."""
        planned = self._plan_launches()
        self._bound = self._bind()
        self._launches = planned

    def _plan_launches(self):
        """What ``_update`` launches, per op (subclasses)."""
        raise NotImplementedError

    def _track_launches(self, op: str, track: Track, columns: tuple) -> list[Launch]:
        """``op``'s launches over one track's tensors: ``columns`` are the op's tensor roles
        in its order, each a flat buffer or a list; lists of the model's tensors are taken
        detached, so a launch needs no autograd mode."""
        names, written = roles(op, len(columns))
        columns = tuple(map(_detached, columns))
        rest = [i for i, t in enumerate(track.live) if id(t) not in self._fused_ids]
        if len(rest) < len(track.live):  # a fused optimizer updates the others
            if not rest:
                return []
            columns = tuple([track.views(c)[i] for i in rest] for c in columns)
        rows = checked_rows(names, columns, written)
        return launches(op, rows, self.backend, self._skipped[track.device])

    def _shadow_launches(self, op: str) -> list[Launch]:
        """``op``'s launches on every track's (shadow, weights): an update of the shadow."""
        return [
            launch
            for track in self._tracks
            for launch in self._track_launches(op, track, (track.shadow, track.weights))
        ]

    def _bind(self) -> BoundTensors:
        """Where the model holds each averaged tensor now, for step()'s check."""
        tensors = [t for track in self._tracks for t in track.live]
        names = [n for track in self._tracks for n in track.names]
        local = [track.dtensor for track in self._tracks for _ in track.live]
        if self._binding is None:
            tables, keys = [None] * len(tensors), [None] * len(tensors)
        else:
            tables, keys = self._binding.tables_and_keys(names)
        return BoundTensors(tables, keys, tensors, local)

    def _ensure_bound(self, what: str) -> None:
        """Refuse ``what`` unless the model still holds the planned memory (one compare per
        tensor, in C++ when the extension is built), planning again where that is sound."""
        if self._swapped or self._bound.first_moved() >= 0:
            self._rebind(what)

    def _rebind(self, what: str) -> None:
        """The model no longer holds the planned tensors where it did, or the shadow is
        swapped in: the full checks explain what changed, or find it harmless (FSDP2's new
        local shards, a module left unsharded after a forward), and the plan is redone."""
        self._check_ready(what)
        self._plan()

    def _check_ready(self, what: str) -> None:
        if self._swapped:
            raise BelayInputError(
                f"{what} inside averaged(): the model holds the shadow right now. "
                "Leave the with-block first."
            )
        flat.check_not_stale(self._groups(), self.method)
        if self._binding is not None:
            self._binding.check()
        # A list of the model's own tensors may follow them to new memory, but not to
        # another dtype: the shadow's dtype was chosen for theirs. (A new shape or device
        # is refused by the row checks when the launches are planned again.)
        flat.refuse_moved(
            [
                name
                for track in self._tracks
                if track.group is None and not track.dtensor and track.full_weights is None
                for name, t, s in zip(track.names, track.live, track.shadow_views)
                if self._shadow_dtype_for(t.dtype) != s.dtype
            ],
            self.method,
            "in the dtype the averager was built for",
        )
        for track in self._tracks:
            if track.dtensor:
                track.weights = distributed.refresh_local_shards(
                    track.names, track.live, track.shadow_views
                )

    def _groups(self) -> list:
        return [t.group for t in self._tracks if t.group is not None]

    # ---- introspection ----------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._steps

    @property
    def num_updates(self) -> int:
        return self._updates

    @property
    def num_skipped(self) -> int:
        """Elements whose non-finite weight was kept out of the shadow (syncs the device)."""
        return int(sum(int(c.item()) for c in self._skipped.values()))

    def shadow_params(self) -> list[torch.Tensor]:
        """The shadow of each averaged tensor, laid out like it (views, not copies), in the
        order of :meth:`names`.

        Where the averaged tensor is sharded (an FSDP2 parameter, or any parameter under
        ``shard_shadow=True``), its shadow is a DTensor with the parameter's global shape
        and placements over this rank's local piece, as ``state_dict()`` holds it:
        ``full_tensor()`` gathers it (a collective) and ``to_local()`` is the local view."""
        return [
            spec.wrap(view) if spec is not None else view
            for view, spec in zip(self._local_shadow_views(), self._specs_in_order())
        ]

    def _local_shadow_views(self) -> list[torch.Tensor]:
        """The shadow per averaged tensor as plain views of this rank's memory."""
        return self._in_caller_order([track.shadow_views for track in self._tracks])

    def names(self) -> list[str]:
        """The averaged tensors' names (module names, or "0", "1", ... for a list)."""
        return list(self._names)

    def _in_caller_order(self, per_track: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        by_name = {
            name: value
            for track, values in zip(self._tracks, per_track)
            for name, value in zip(track.names, values)
        }
        return [by_name[n] for n in self._names]

    @property
    def launches_per_step(self) -> int:
        """Op calls one ``step()`` makes: one per flat buffer, one per list of leftovers."""
        return len(self._tracks)

    def memory_report(self) -> str:
        """What the averager's own tensors cost, next to the weights they average."""
        lines = []
        for track in self._tracks:
            # what this rank holds: its local shards, or under shard_shadow the whole weights
            held = track.weights if track.dtensor else track.full_weights
            w_bytes = _nbytes(track.live if held is None else _as_list(held))
            s_bytes = _nbytes(track.state_tensors())
            path = "flat buffer" if track.group is not None else "tensor list"
            if track.dtensor:
                path = "local shards"
            elif track.full_weights is not None:
                path += ", this rank's 1/world of the shadow"
            lines.append(
                f"{track.device} {track.live[0].dtype} ({path}, {len(track.live)} tensors): "
                f"weights {_mib(w_bytes)}, averager state {_mib(s_bytes)}"
            )
        lines.append(f"total averager state: {_mib(self.state_bytes)}")
        return "\n".join(lines)

    @property
    def state_bytes(self) -> int:
        """Bytes of the averager's own tensors (the shadow; TwoPoint also its average)."""
        return sum(_nbytes(track.state_tensors()) for track in self._tracks)

    # ---- evaluation -------------------------------------------------------------------
    def _eval_buffers(self) -> list[TensorOrList]:
        """Per track, the averaged values that averaged() swaps in and copy_to() writes,
        laid out like its shadow and of its dtype (TwoPoint computes them here)."""
        return [t.shadow for t in self._tracks]

    @contextlib.contextmanager
    def averaged(self) -> Iterator[nn.Module | None]:
        """Swap the averaged weights into the model in place, and back on exit, bit-exactly.

        No copy of the model is made. Yields the module (or None for a parameter list)."""
        self._ensure_bound("averaged()")
        # the shadows' dtypes are the evaluation buffers', so refuse before any is computed
        for track in self._tracks:
            for w, s in zip(_as_list(track.weights), _as_list(track.shadow)):
                if not swap_supported(w.dtype, s.dtype):
                    raise BelayInputError(
                        f"averaged() cannot swap {w.dtype} weights with a {s.dtype} shadow "
                        f"exactly in place (supported: {', '.join(SWAP_PAIRS)}). Use "
                        "copy_to(another_model), or build the averager with "
                        f"shadow_dtype={w.dtype}."
                    )
        pairs = [
            self._swap_pair(track, averaged)
            for track, averaged in zip(self._tracks, self._eval_buffers())
        ]
        for live, avg in pairs:
            ops.swap_(live, avg, backend=self.backend)
        self._swapped = True
        try:
            yield self._module
        finally:
            if self._binding is not None:
                self._binding.reshard()  # drop what a forward inside all-gathered
            for live, avg in reversed(pairs):
                ops.swap_(live, avg, inverse=True, backend=self.backend)
            self._swapped = False

    @staticmethod
    def _swap_pair(track: Track, averaged: TensorOrList):
        """(weights, averaged) as averaged() swaps them: for a sharded DDP shadow, the whole
        weights and the average all-gathered into a temporary laid out like them."""
        if track.full_weights is None:
            return track.weights, averaged
        pieces = [spec.full(a) for spec, a in zip(track.specs, _as_list(averaged))]
        if track.group is None:
            return track.full_weights, pieces
        gathered = torch.empty(
            track.group.buffer.numel(), dtype=pieces[0].dtype, device=track.group.buffer.device
        )
        for slot, piece in zip(track.group.slots, pieces):
            track.group.view(gathered, slot).copy_(piece)
        return track.full_weights, gathered

    def copy_to(self, target: nn.Module | Iterable[torch.Tensor]) -> None:
        """Write the averaged weights into ``target``: a module with the same names (its
        other state is copied from the live model), or tensors in the averager's order."""
        self._ensure_bound("copy_to()")
        names = self.names()
        if isinstance(target, nn.Module):
            target = _uncompiled(target)
            dests = dict(target.named_parameters()) | dict(target.named_buffers())
            missing = [n for n in names if n not in dests]
            if missing:
                raise BelayInputError(
                    f"copy_to: the target module has no tensors named {missing[:5]}."
                )
            ordered = [dests[n] for n in names]
        else:
            ordered = list(target)
            if len(ordered) != len(names):
                raise BelayInputError(
                    f"copy_to: got {len(ordered)} tensors, the averager holds {len(names)}."
                )
        plan, bad = [], []
        local_shapes = {n: s.shape for n, s in zip(names, self._local_shadow_views())}
        for n, d, spec in zip(names, ordered, self._specs_in_order()):
            shape = spec.shape if spec is not None else local_shapes[n]
            if spec is not None and spec.same_layout(d):  # sharded alike: local to local
                plan.append((d._local_tensor, False))
            elif distributed.is_dtensor(d):
                bad.append(
                    f"{n}: target is sharded as {distributed.Spec.of(d).describe()}, "
                    f"the average as {spec.describe() if spec else tuple(shape)}"
                )
            elif d.shape != shape:
                bad.append(f"{n}: target {tuple(d.shape)} vs averaged {tuple(shape)}")
            else:
                plan.append((d, spec is not None))  # a whole target: gather the pieces
        if bad:
            raise BelayInputError("copy_to: shapes differ: " + "; ".join(bad[:5]))
        averaged = self._averaged_values()
        specs = self._specs_in_order()
        with torch.no_grad():
            if (
                isinstance(target, nn.Module)
                and self._module is not None
                and target is not self._module
            ):
                target.load_state_dict(
                    distributed.state_like(target.state_dict(), self._module.state_dict())
                )
            for (dest, gather), value, spec in zip(plan, averaged, specs):
                dest.copy_(spec.full(value) if gather else value)

    def _specs_in_order(self) -> list[distributed.Spec | None]:
        """Each averaged tensor's distributed layout (None for a whole local tensor)."""
        return self._in_caller_order([t.specs or [None] * len(t.names) for t in self._tracks])

    def _full_averaged_values(self) -> list[torch.Tensor]:
        """The whole averaged tensors, gathered where sharded (a collective then)."""
        return [
            spec.full(v) if spec is not None else v
            for v, spec in zip(self._averaged_values(), self._specs_in_order())
        ]

    def _averaged_values(self) -> list[torch.Tensor]:
        """The averaged tensors in the order of :meth:`names`, shaped like them (views)."""
        return self._in_caller_order(
            [t.views(b) for t, b in zip(self._tracks, self._eval_buffers())]
        )

    # ---- checkpoints ------------------------------------------------------------------
    def hparams(self) -> dict:
        """The hyperparameters, as state_dict() saves them (a new dict on each call, so a
        method rather than a property)."""
        return self._hparams.to_state()

    def _saved_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensor state by kind, each list in ``names()`` order."""
        return {"shadow": self._local_shadow_views()}

    def state_dict(self) -> dict:
        """The shadow (views, no copy), the counters and the hyperparameters.

        It works after the model's tensors were replaced (``model.to(...)``), with a
        warning that the views are stale: the shadow is the averager's own memory, and this
        is how it is carried over to an averager built on the moved model.
        """
        if self._swapped:
            self._check_ready("state_dict()")
        stale = flat.stale_names(self._groups())
        if stale:
            warnings.warn(
                f"state_dict(): the model's tensors ({', '.join(stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}) were replaced since this averager was "
                "built, so its views of them are stale; the shadow saved here is intact. "
                f"Load it into belay_kernels.{self.method}(model, ...) built on the moved "
                "model with load_state_dict().",
                StaleViewsWarning,
                stacklevel=2,
            )
        names = self.names()
        specs = self._specs_in_order()
        distributed_state = any(spec is not None for spec in specs)
        return {
            "method": self.method,
            "format": STATE_FORMAT,
            "hparams": self.hparams(),
            "nonfinite": self.nonfinite,
            "num_steps": self._steps,
            "num_updates": self._updates,
            # summed over the ranks when sharded (state_dict() is then a collective)
            "num_skipped": distributed.global_count(self.num_skipped)
            if distributed_state
            else self.num_skipped,
            **{  # sharded tensors as DTensors over the local views, so DCP reshards them
                kind: {
                    n: spec.wrap(t) if spec is not None else t
                    for n, t, spec in zip(names, tensors, specs)
                }
                for kind, tensors in self._saved_tensors().items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`. Everything it reads is checked first (keys,
        types, the range of every counter and hyperparameter, every tensor's shape and
        dtype): a bad state raises :class:`BelayInputError` naming the field, and the
        averager is left as it was."""
        self._check_ready("load_state_dict()")
        self._restore(self._checked_state(state))
        self._plan()

    def _checked_state(self, state: object) -> dict:
        """What load_state_dict() will write, each field checked; nothing is written here.
        Subclasses add their own fields to the dict this returns."""
        if not isinstance(state, Mapping) or state.get("method") != self.method:
            got = state.get("method") if isinstance(state, Mapping) else type(state).__name__
            raise BelayInputError(
                f"this averager is {self.method}, but the state is from {got!r}; load a "
                f"state saved by {self.method}.state_dict()."
            )
        if state.get("format") != STATE_FORMAT:
            raise BelayInputError(
                f"state format {state.get('format')!r} is not supported (expected {STATE_FORMAT})."
            )
        absent = [k for k in self._STATE_KEYS if k not in state]
        if absent:
            raise BelayInputError(f"the state lacks {absent}; pass what state_dict() returned.")
        hparams = type(self._hparams).from_state(state["hparams"])
        try:
            nonfinite = state["nonfinite"]
            check_nonfinite(nonfinite)
        except BelayInputError as exc:
            raise BelayInputError(f"the state's nonfinite is bad: {exc}") from None
        steps = check_saved_count(state, "num_steps")
        updates = check_saved_count(state, "num_updates")
        if updates > steps:
            raise BelayInputError(
                f"the state's num_updates ({updates}) exceeds its num_steps ({steps}): a "
                "shadow is updated at most once per step."
            )
        return {
            "tensors": self._checked_tensors(state),
            "hparams": hparams,
            "nonfinite": nonfinite,
            "num_steps": steps,
            "num_updates": updates,
            "num_skipped": check_saved_count(state, "num_skipped"),
        }

    def _checked_tensors(self, state: Mapping) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, this rank's value) for every saved tensor, shapes and dtypes checked.
        A sharded value is cut to this rank's piece here, before anything is written."""
        names = self.names()
        specs = self._specs_in_order()
        problems, plan = [], []
        for kind, tensors in self._saved_tensors().items():
            theirs = state.get(kind)
            if not isinstance(theirs, Mapping):
                problems.append(f"no {kind!r} tensors in the state")
                continue
            missing = [n for n in names if n not in theirs]
            unexpected = [n for n in theirs if n not in set(names)]
            if missing:
                problems.append(f"{kind} missing: {missing[:5]}")
            if unexpected:
                problems.append(f"{kind} unexpected: {unexpected[:5]}")
            for name, t, spec in zip(names, tensors, specs):
                if name not in theirs:
                    continue
                other = theirs[name]
                shape = spec.shape if spec is not None else t.shape
                if not isinstance(other, torch.Tensor):
                    problems.append(f"{kind} {name}: a {type(other).__name__}, not a tensor")
                elif not other.is_floating_point() or other.is_meta:
                    problems.append(
                        f"{kind} {name}: saved as a {other.dtype} tensor on {other.device}; "
                        "expected floating-point values"
                    )
                elif tuple(other.shape) != tuple(shape):
                    problems.append(
                        f"{kind} {name}: saved shape {tuple(other.shape)}, model shape {tuple(shape)}"
                    )
                else:
                    plan.append((t, spec.local_of(other) if spec is not None else other))
        if problems:
            raise BelayInputError(
                "the state does not fit this model (was it saved from a different one?): "
                + "; ".join(problems[:8])
            )
        return plan

    def _restore(self, checked: dict) -> None:
        """Write what _checked_state() returned."""
        with torch.no_grad():
            for dest, value in checked["tensors"]:
                dest.copy_(value)
        self._hparams = checked["hparams"]
        self.nonfinite = checked["nonfinite"]
        self._steps = checked["num_steps"]
        self._updates = checked["num_updates"]
        # state_dict() saves the count summed over the ranks: one rank holds it again
        sharded = any(s is not None for s in self._specs_in_order())
        first = distributed.is_first_rank() if sharded else True
        for i, counter in enumerate(self._skipped.values()):
            counter.fill_(checked["num_skipped"] if i == 0 and first else 0)

    _STATE_KEYS = ("hparams", "nonfinite", "num_steps", "num_updates", "num_skipped")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{self.method}({settings}, tracks={len(self._tracks)}, steps={self._steps})"


def check_saved_count(state: Mapping, key: str) -> int:
    """A counter of a saved state: an int >= 0 (a float or a bool is refused, not rounded)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise BelayInputError(f"the state's {key} must be an int >= 0, got {value!r}.")
    return int(value)


def _detached(t: TensorOrList) -> TensorOrList:
    """A flat buffer as it is (it is the averager's own); a list of the model's tensors as
    detached aliases of the same memory."""
    return t if isinstance(t, torch.Tensor) else [x.detach() for x in t]


def _as_list(t: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _mib(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class EMA(Averager):
    """Exponential moving average: ``shadow += (1 - decay) (weights - shadow)``.

    ``decay`` is a float or a schedule (:class:`~belay_kernels.schedules.Warmup`);
    ``half_life`` (in steps) is another way to give a constant decay. With ``every=k``
    the shadow updates on every k-th step with decay ``decay ** k``, so its time
    constant in optimizer steps stays the same.
    """

    method = "EMA"
    schedule, every = HparamAttribute(), HparamAttribute()

    def __init__(
        self,
        module_or_params,
        *,
        decay: float | Constant | Warmup | None = None,
        half_life: float | None = None,
        every: int = 1,
        **options,
    ):
        self._hparams = EMAHparams(decay_schedule(decay, half_life), every)
        super().__init__(module_or_params, **options)

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        return [("ema_update_", (shadow_dtype, weights_dtype))]

    def decay_at(self, t: int) -> float:
        """The decay applied at step ``t`` (0 for steps that do not update)."""
        return every_k(self.schedule.decay_at(t), self.every)

    def _plan_launches(self):
        return self._shadow_launches("ema_update_")

    def _average_at(self, t: int) -> tuple[str, tuple]:
        return ("none", ()) if t % self.every else ("ema", (self.decay_at(t),))

    def _update(self, t: int) -> None:
        average, scalars = self._average_at(t)
        if average == "none":
            return
        decay, skip = scalars[0], self._skip
        for launch in self._launches:
            launch.kernel(*launch.tensors, decay, skip, launch.skipped)
        self._updates += 1


class SWA(Averager):
    """Stochastic weight averaging: the equal mean of the weights at steps ``start``,
    ``start + every``, ... The first update copies."""

    method = "SWA"
    start, every = HparamAttribute(), HparamAttribute()

    def __init__(self, module_or_params, *, start: int = 0, every: int = 1, **options):
        self._hparams = SWAHparams(start, every)
        super().__init__(module_or_params, **options)

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        return [("swa_update_", (shadow_dtype, weights_dtype))]

    def _plan_launches(self):
        return self._shadow_launches("swa_update_")

    def _average_at(self, t: int) -> tuple[str, tuple]:
        if t < self.start or (t - self.start) % self.every:
            return "none", ()
        return "swa", (self._updates,)

    def _update(self, t: int) -> None:
        average, scalars = self._average_at(t)
        if average == "none":
            return
        count, skip = scalars[0], self._skip
        for launch in self._launches:
            launch.kernel(*launch.tensors, count, skip, launch.skipped)
        self._updates += 1


class Belay(Averager):
    """BELAY: the model and the shadow are two masses on a spring (``docs/methods.md``
    gives the physics and its source). After the optimizer's step, both sides read before
    either write::

        weights <- weights + beta  * (shadow - weights)       # the spring pulls the model
        shadow  <- shadow  + alpha * (weights_before - shadow)  # the shadow is an EMA

    ``beta = 0`` is exactly an EMA with ``decay = 1 - alpha``. Floating buffers (running
    statistics) are averaged by that EMA and are not pulled.

    ``form="poster"`` is BELAY as the poster writes it: the shadow follows the weights from
    *before* the optimizer's step. Only an optimizer fused with the averager
    (:func:`belay_kernels.fuse`) has those weights, so this form's own ``step()`` refuses.
    """

    method = "Belay"
    _buffers_join_params = False
    _can_shard_shadow = False
    alpha, beta, eta, form = (
        HparamAttribute(),
        HparamAttribute(),
        HparamAttribute(),
        HparamAttribute(),
    )

    def __init__(
        self,
        module_or_params,
        *,
        alpha: float,
        beta: float,
        form: str = "post-step",
        **options,
    ):
        self._hparams = BelayHparams(alpha, beta, form=form)
        super().__init__(module_or_params, **options)

    def step(self) -> None:
        if self.form == "poster" and self._fused_by is None:
            raise BelayInputError(
                "Belay(form='poster') updates the shadow from the weights of before the "
                "optimizer's step, which are gone once optimizer.step() returns; only a fused "
                "step has both. Fuse the two (optimizer = belay_kernels.fuse(optimizer, "
                "belay)) and call optimizer.step(), or use the post-step form."
            )
        super().step()

    def _average_at(self, t: int) -> tuple[str, tuple]:
        return ("poster" if self.form == "poster" else "belay"), (self.alpha, self.beta)

    @classmethod
    def from_physics(cls, module_or_params, *, k: float, m1: float, m2: float, **options) -> Belay:
        """Critical damping (c1 = 2 m1, c2 = 2 m2) with spring constant ``k``, model mass
        ``m1`` and shadow mass ``m2``: ``alpha = k / (2 m2)``, ``beta = k / (2 m1)``. The
        implied optimizer step scale ``eta = 1 / (2 m1)`` is kept as ``.eta``."""
        for name, value in (("k", k), ("m1", m1), ("m2", m2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise BelayInputError(f"{name} must be a positive number, got {value!r}.")
        alpha, beta = k / (2 * m2), k / (2 * m1)
        for name, value, mass in (("alpha", alpha, "m2"), ("beta", beta, "m1")):
            if value > 1:
                raise BelayInputError(
                    f"k={k}, {mass}={m2 if mass == 'm2' else m1} give {name} = {value:.4g} > 1; "
                    f"the discrete step needs {mass} >= k / 2."
                )
        averager = cls(module_or_params, alpha=alpha, beta=beta, **options)
        averager.eta = 1 / (2 * m1)
        return averager

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        if is_param:
            return [("belay_step_", (weights_dtype, shadow_dtype))]
        return [("ema_update_", (shadow_dtype, weights_dtype))]

    def _plan_launches(self):
        """(the parameters' BELAY launches, the floating buffers' EMA launches)"""
        pulled, averaged = [], []
        for track in self._tracks:
            if track.is_param:
                pulled += self._track_launches("belay_step_", track, (track.weights, track.shadow))
            else:
                averaged += self._track_launches(
                    "ema_update_", track, (track.shadow, track.weights)
                )
        return pulled, averaged

    def _update(self, t: int) -> None:
        alpha, beta, skip = self.alpha, self.beta, self._skip
        pulled, averaged = self._launches
        for launch in pulled:
            launch.kernel(*launch.tensors, alpha, beta, skip, launch.skipped)
        for launch in averaged:
            launch.kernel(*launch.tensors, 1 - alpha, skip, launch.skipped)
        self._updates += 1


class TwoPoint(Averager):
    """The two-point average of Sandler et al.: ``(weights + snapshot) / 2``, where the
    snapshot is retaken whenever it is ``gap`` steps old (at steps gap, 2 gap, ...; the
    first is the weights at construction). ``snapshot_age`` says how old it is now.

    Memory: the snapshot, in the weights' dtype so it is exact, plus the averaged buffer
    that ``averaged()`` swaps in, filled only when evaluating.
    """

    method = "TwoPoint"
    _shadow_in_weights_dtype = True
    gap = HparamAttribute()

    def __init__(self, module_or_params, *, gap: int, **options):
        self._hparams = TwoPointHparams(gap)
        self._snapshot_step = 0
        super().__init__(module_or_params, **options)

    def _add_state(self) -> None:
        # the shadow made by the base class is the snapshot
        for track in self._tracks:
            track.average = track.like_shadow(torch.empty_like)

    @property
    def snapshot_age(self) -> int:
        return self._steps - self._snapshot_step

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        # what averaged() and copy_to() run; the average is laid out like the snapshot
        return [("two_point_average_", (shadow_dtype, weights_dtype, shadow_dtype))]

    def _plan_launches(self):
        """Per track, (snapshots, weights) as two lists for one ``torch._foreach_copy_``."""
        planned = []
        for track in self._tracks:
            rows = checked_rows(
                ("snapshot", "weights"), (track.shadow, _detached(track.weights)), (0,)
            )
            planned.append(tuple(list(column) for column in zip(*rows)))
        return planned

    def _update(self, t: int) -> None:
        if (t + 1) % self.gap:
            return
        for snapshots, weights in self._launches:
            torch._foreach_copy_(snapshots, weights)
        self._snapshot_step = t + 1
        self._updates += 1

    def _eval_buffers(self) -> list[TensorOrList]:
        for track in self._tracks:
            ops.two_point_average(
                track.weights, track.shadow, out=track.average, backend=self.backend
            )
        return [t.average for t in self._tracks]

    def _saved_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"snapshot": self._local_shadow_views()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["snapshot_step"] = self._snapshot_step
        return state

    _STATE_KEYS = Averager._STATE_KEYS + ("snapshot_step",)

    def _checked_state(self, state: object) -> dict:
        checked = super()._checked_state(state)
        snapshot_step = check_saved_count(state, "snapshot_step")
        if snapshot_step > checked["num_steps"]:
            raise BelayInputError(
                f"the state's snapshot_step ({snapshot_step}) is after its num_steps "
                f"({checked['num_steps']}): a snapshot is taken at a step already made."
            )
        return {**checked, "snapshot_step": snapshot_step}

    def _restore(self, checked: dict) -> None:
        super()._restore(checked)
        self._snapshot_step = checked["snapshot_step"]
