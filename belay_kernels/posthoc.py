"""Post-hoc EMA (EDM2): track power-function EMA profiles, snapshot them during training,
and reconstruct the EMA of any other length afterwards.

    phema = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=500,
                       snapshot_dir="phema")
    for batch in loader:
        ...
        optimizer.step()
        phema.step()                    # every profile in one op call per flat buffer
    phema.wait()                        # the last snapshot is written by a thread
    weights = reconstruct("phema", sigma_rel=0.07)   # after training: no model needed
    model.load_state_dict(weights)

The formulas are in :mod:`belay_kernels.power`, the snapshots' layouts (a file per
snapshot, or a sharded checkpoint folder under FSDP2) in :mod:`belay_kernels.snapshots`,
and reconstruction in :mod:`belay_kernels.reconstruction`. ``belay-kernels posthoc DIR
--sigma-rel 0.07 --out FILE.pt`` is the command-line form of :func:`reconstruct`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import distributed, power, snapshots
from ._checks import BelayInputError
from .averagers import Averager, _mib, check_saved_count
from .hparams import HparamAttribute, Hparams, check_every, set_converted

# reconstruction lives in its own module; these are its public names, as posthoc.* in the docs
from .reconstruction import (  # noqa: F401
    export,
    plan,
    read_snapshot,
    reconstruct,
    reconstruct_many,
    snapshot_files,
    write_dcp,
)


def _dtype_name(dtype) -> str:
    """How a checkpoint names a snapshot dtype: ``torch.float16`` (or "float16") as "float16"."""
    return str(dtype).removeprefix("torch.")


def _update_due(t: int, every: int) -> bool:
    """Whether 0-based step ``t`` updates: the n-th update falls on step ``n * every``
    (1-based), the time the power-function decay assumes."""
    return (t + 1) % every == 0


@dataclass(frozen=True)
class PowerEMAHparams(Hparams):
    gamma: float
    every: int = 1

    def __post_init__(self):
        set_converted(self, "gamma", power.check_gamma(self.gamma))
        check_every("every", self.every)


class PowerEMA(Averager):
    """EDM2's power-function EMA: at the n-th update ``decay = (1 - 1/n)^(gamma + 1)``, so
    the first update copies and the average always spans the whole run, with relative
    width ``sigma_rel``. Give ``sigma_rel`` (0 < sigma_rel < sqrt(1/12)) or ``gamma``
    (> 0). With ``every=k`` it updates on steps k, 2k, ... with the same decays, which
    keeps the profile (see :mod:`belay_kernels.power`)."""

    method = "PowerEMA"
    gamma, every = HparamAttribute(), HparamAttribute()

    def __init__(self, module_or_params, *, sigma_rel=None, gamma=None, every: int = 1, **options):
        self._hparams = PowerEMAHparams(power.resolve_gamma(sigma_rel, gamma), every)
        super().__init__(module_or_params, **options)

    @property
    def sigma_rel(self) -> float:
        return power.gamma_to_sigma_rel(self.gamma)

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        return [("ema_update_", (shadow_dtype, weights_dtype))]

    def _plan_launches(self):
        return self._shadow_launches("ema_update_")

    def _average_at(self, t: int) -> tuple[str, tuple]:
        if not _update_due(t, self.every):
            return "none", ()
        return "ema", (power.decay(self._updates + 1, self.gamma),)

    def _update(self, t: int) -> None:
        average, scalars = self._average_at(t)
        if average == "none":
            return
        decay, skip = scalars[0], self._skip
        for launch in self._launches:
            launch.kernel(*launch.tensors, decay, skip, launch.skipped)
        self._updates += 1


def _check_snapshot_dir(path) -> Path:
    """A folder that exists, or can be made, and can be written; nothing is created."""
    if not isinstance(path, (str, os.PathLike)):
        raise BelayInputError(f"snapshot_dir must be a path, got {type(path).__name__}.")
    folder = Path(path)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a folder" if not probe.is_dir() else "is not writable"
        raise BelayInputError(
            f"snapshot_dir {str(folder)!r} cannot be written: {str(probe)!r} {what}. "
            "Pass a folder you can write (it is created when the first snapshot is saved)."
        )
    return folder


@dataclass(frozen=True)
class PostHocEMAHparams(Hparams):
    gammas: tuple[float, ...]
    snapshot_every: int
    snapshot_dtype: str = "float16"  # a name in snapshots.DTYPES, as checkpoints store it
    every: int = 1

    def __post_init__(self):
        gammas = tuple(power.check_gamma(g) for g in self.gammas)
        if not gammas or len(set(gammas)) != len(gammas):
            raise BelayInputError(f"the profiles need distinct values, got gammas {list(gammas)}.")
        set_converted(self, "gammas", gammas)
        check_every("snapshot_every", self.snapshot_every)
        check_every("every", self.every)
        if self.snapshot_every % self.every:
            raise BelayInputError(
                f"snapshot_every ({self.snapshot_every}) must be a multiple of every "
                f"({self.every}), so that each snapshot is taken at an update."
            )
        if self.snapshot_dtype not in snapshots.DTYPES:
            raise BelayInputError(
                f"snapshot_dtype must be one of {list(snapshots.DTYPES)}, got {self.snapshot_dtype!r}."
            )

    def to_state(self) -> dict:
        return {**super().to_state(), "gammas": list(self.gammas)}


class PostHocEMA(Averager):
    """K power-function EMA profiles (``sigma_rels``), updated together by one
    :func:`~belay_kernels.ops.multi_ema_update_` call per flat buffer, and every
    ``snapshot_every`` steps saved to ``snapshot_dir`` with all K profiles in
    ``snapshot_dtype``. :func:`reconstruct` turns the snapshots into the EMA of any other
    ``sigma_rel``. The layouts, checksums and crash safety are in
    :mod:`belay_kernels.snapshots`.

    - **Where it writes.** One process writes one file per snapshot. Under DDP only rank 0
      writes (the ranks' profiles are equal). After ``fully_shard`` (FSDP2), or under DDP
      with ``shard_shadow=True``, the profiles cover each rank's local shards or dim-0
      chunks, and every rank writes its pieces into one ``torch.distributed.checkpoint``
      folder per snapshot. Buffers, and any tensor every rank holds whole, are rank 0's.
    - **Off the training thread.** A snapshot step copies the profiles into CPU buffers
      kept for that, and a writer thread writes them (``write_in_background=False``: in
      ``step()``). One write is in flight at most: the next snapshot, ``state_dict()`` and
      :meth:`wait` wait for it. A failed write raises
      :class:`~belay_kernels.snapshots.SnapshotWriteError` at the next step (before it
      changes anything) or at :meth:`wait`. Call :meth:`wait` when training ends.

    ``averaged(sigma_rel=...)`` swaps in one of the tracked profiles (default: the first).
    ``state_dict()`` carries the profiles and counters (the snapshots are files); a run
    resumed from it continues the snapshot numbering. Options as for every averager.
    """

    method = "PostHocEMA"
    _STATE_KEYS = Averager._STATE_KEYS + ("num_snapshots",)
    snapshot_every, every = HparamAttribute(), HparamAttribute()

    def __init__(
        self,
        module_or_params,
        *,
        sigma_rels=(0.05, 0.10),
        snapshot_every: int,
        snapshot_dir,
        snapshot_dtype: torch.dtype = torch.float16,
        every: int = 1,
        write_in_background: bool = True,
        **options,
    ):
        if not isinstance(write_in_background, bool):
            raise BelayInputError(
                f"write_in_background must be True or False, got {write_in_background!r}."
            )
        if isinstance(sigma_rels, (int, float)) or not sigma_rels:
            raise BelayInputError(
                f"sigma_rels must be a non-empty sequence of numbers, got {sigma_rels!r} "
                "(e.g. (0.05, 0.10))."
            )
        gammas = [power.sigma_rel_to_gamma(s) for s in sigma_rels]
        self._hparams = PostHocEMAHparams(
            gammas, snapshot_every, _dtype_name(snapshot_dtype), every
        )
        self.snapshot_dir = _check_snapshot_dir(snapshot_dir)
        self._selected = 0
        self._snapshots = 0
        self._writer = snapshots.SnapshotWriter(write_in_background)
        super().__init__(module_or_params, **options)
        module = self._module
        self._buffer_names = {n for n, _ in module.named_buffers()} if module is not None else set()

    def _add_state(self) -> None:
        # profile 0 is the base class's shadow; the others start as copies of it
        for track in self._tracks:
            track.extra_profiles = [track.like_shadow(torch.clone) for _ in self.gammas[1:]]
        self._staging: list[list] | None = None  # per profile, per track: the CPU copy
        # FSDP2's local shards, or this rank's chunks under shard_shadow=True
        self._sharded = any(t.specs is not None for t in self._tracks)
        # one file set per snapshot: under DDP the ranks hold the same profiles
        self._writes_here = self._sharded or distributed.is_first_rank()
        self._group = self._mesh = None
        if self._sharded:
            self._group, self._mesh = _snapshot_group(self.names(), self._specs_in_order())

    @property
    def gammas(self) -> list[float]:
        return list(self._hparams.gammas)

    @gammas.setter
    def gammas(self, gammas) -> None:
        hparams = replace(self._hparams, gammas=gammas)
        if len(hparams.gammas) != len(self._hparams.gammas):
            raise BelayInputError(
                f"this PostHocEMA keeps {len(self._hparams.gammas)} profiles, so it takes "
                f"{len(self._hparams.gammas)} gammas, got {len(hparams.gammas)}; build a new "
                "PostHocEMA for another number of profiles."
            )
        self._hparams = hparams

    @property
    def snapshot_dtype(self) -> torch.dtype:
        return snapshots.DTYPES[self._hparams.snapshot_dtype]

    @snapshot_dtype.setter
    def snapshot_dtype(self, dtype) -> None:
        self._hparams = replace(self._hparams, snapshot_dtype=_dtype_name(dtype))
        self._writer.wait()  # the write in flight reads the staging buffers
        self._staging = None

    @property
    def write_in_background(self) -> bool:
        return self._writer.background

    @property
    def sigma_rels(self) -> list[float]:
        return [power.gamma_to_sigma_rel(g) for g in self.gammas]

    @property
    def num_snapshots(self) -> int:
        return self._snapshots

    def _track_ops(self, weights_dtype, shadow_dtype, is_param):
        return [("multi_ema_update_", (shadow_dtype,) * len(self.gammas) + (weights_dtype,))]

    def _plan_launches(self):
        return [
            launch
            for track in self._tracks
            for launch in self._track_launches(
                "multi_ema_update_", track, (track.shadow, *track.extra_profiles, track.weights)
            )
        ]

    def _average_at(self, t: int) -> tuple[str, tuple]:
        if not _update_due(t, self.every):
            return "none", ()
        n = self._updates + 1
        return "ema", tuple(power.decay(n, g) for g in self._hparams.gammas)

    def _update(self, t: int) -> None:
        average, decays = self._average_at(t)
        if average == "none":
            return
        decays, skip = list(decays), self._skip
        for launch in self._launches:
            launch.kernel(*launch.tensors, decays, skip, launch.skipped)
        self._updates += 1

    def _ensure_bound(self, what: str) -> None:
        # every step (fused or not) comes through here before it changes anything
        self._writer.raise_failure()
        super()._ensure_bound(what)

    def _advance(self) -> None:
        super()._advance()
        if self._steps % self.snapshot_every == 0:
            self._write_snapshot()

    def memory_report(self) -> str:
        """The averager's tensors, and the CPU buffers snapshots are staged in: each
        profile in ``snapshot_dtype``, made at the first snapshot on a rank that writes."""
        numel = sum(v.numel() for v in self._local_shadow_views())
        staged = len(self.gammas) * numel * self.snapshot_dtype.itemsize if self._writes_here else 0
        return (
            f"{super().memory_report()}\n"
            f"snapshot staging on the CPU, from the first snapshot: {_mib(staged)}"
        )

    def wait(self) -> None:
        """Wait for the snapshot write in flight; raise
        :class:`~belay_kernels.snapshots.SnapshotWriteError` if it failed."""
        self._writer.wait()

    # ---- snapshots ---------------------------------------------------------------------
    def _profile_buffers(self, k: int) -> list:
        """Profile ``k`` per track, laid out like the track's shadow."""
        return [t.shadow if k == 0 else t.extra_profiles[k - 1] for t in self._tracks]

    def _profile(self, k: int) -> list[torch.Tensor]:
        """Profile ``k`` per averaged tensor, in the order of names() (views)."""
        return self._in_caller_order(
            [t.views(b) for t, b in zip(self._tracks, self._profile_buffers(k))]
        )

    def _stage(self) -> list[list]:
        """Profile by profile, each track's profile copied into CPU buffers of the snapshot
        dtype, kept from one snapshot to the next (the previous write has finished).
        Returns per profile the per-name views, in the order of names()."""
        dtype = self.snapshot_dtype
        if self._staging is None:
            pinned = torch.cuda.is_available() and any(
                t.device.type == "cuda" for t in self._tracks
            )
            self._staging = [
                [
                    t.like_shadow(lambda s: torch.empty(s.shape, dtype=dtype, pin_memory=pinned))
                    for t in self._tracks
                ]
                for _ in self.gammas
            ]
        staged = []
        with torch.no_grad():
            for k, buffers in enumerate(self._staging):
                for dest, src in zip(buffers, self._profile_buffers(k)):
                    if isinstance(dest, torch.Tensor):
                        dest.copy_(src)
                    else:
                        torch._foreach_copy_(dest, src)
                staged.append(
                    self._in_caller_order([t.views(b) for t, b in zip(self._tracks, buffers)])
                )
        return staged

    def _write_snapshot(self) -> None:
        index = self._snapshots + 1
        self._snapshots = index
        if not self._writes_here:
            return
        self._writer.wait()  # raises if the previous write failed; frees the staging buffers
        names, specs = self.names(), self._specs_in_order()
        staged = self._stage()
        header = {
            "kind": snapshots.KIND,
            "format": snapshots.FORMAT,
            "index": index,
            "step": self._steps,
            "gammas": list(self.gammas),
            "sigma_rels": self.sigma_rels,
            "names": names,
            "shapes": [
                list(spec.shape if spec is not None else v.shape)
                for v, spec in zip(staged[0], specs)
            ],
            "is_param": [n not in self._buffer_names for n in names],
            "dtype": self._hparams.snapshot_dtype,
        }
        # the model's buffers as they are (BatchNorm statistics are not reconstructed)
        buffers = (
            {n: b.detach().to("cpu", copy=True) for n, b in self._module.named_buffers()}
            if self._module is not None
            else {}
        )
        folder = self.snapshot_dir
        if self._sharded:
            pieces = [
                [
                    (n, v, None if spec is None else replace(spec, mesh=self._mesh))
                    for n, v, spec in zip(names, profile, specs)
                ]
                for profile in staged
            ]
            what = f"snapshot {str(folder / snapshots.folder_name(index))!r}"
            write = functools.partial(
                snapshots.write_folder, folder, index, header, pieces, buffers, self._group
            )
        else:
            what = f"snapshot {str(folder / snapshots.file_name(index))!r}"
            write = functools.partial(snapshots.write_file, folder, index, header, staged, buffers)
        self._writer.submit(what, write)

    # ---- evaluation and checkpoints ---------------------------------------------------
    def _index_of(self, sigma_rel) -> int:
        if sigma_rel is None:
            return 0
        for k, s in enumerate(self.sigma_rels):
            if isinstance(sigma_rel, (int, float)) and math.isclose(s, sigma_rel, rel_tol=1e-9):
                return k
        raise BelayInputError(
            f"sigma_rel={sigma_rel!r} is not tracked; the profiles are sigma_rel "
            f"{[round(s, 6) for s in self.sigma_rels]}. Use reconstruct() for another one."
        )

    @contextlib.contextmanager
    def _selecting(self, sigma_rel):
        previous, self._selected = self._selected, self._index_of(sigma_rel)
        try:
            yield
        finally:
            self._selected = previous

    @contextlib.contextmanager
    def averaged(self, sigma_rel: float | None = None):
        """The profile ``sigma_rel`` (default: the first) swapped into the model in place."""
        with self._selecting(sigma_rel), super().averaged() as module:
            yield module

    def copy_to(self, target, sigma_rel: float | None = None) -> None:
        with self._selecting(sigma_rel):
            super().copy_to(target)

    def _eval_buffers(self) -> list:
        return self._profile_buffers(self._selected)

    def _saved_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {f"profile_{k}": self._profile(k) for k in range(len(self.gammas))}

    def state_dict(self) -> dict:
        self.wait()  # a checkpoint taken now never counts a snapshot that is not on disk
        state = super().state_dict()
        state["num_snapshots"] = self._snapshots
        return state

    def load_state_dict(self, state: dict) -> None:
        self.wait()
        super().load_state_dict(state)

    def _checked_state(self, state: object) -> dict:
        checked = super()._checked_state(state)
        saved = len(checked["hparams"].gammas)
        if saved != len(self.gammas):
            raise BelayInputError(
                f"the state holds {saved} profiles (sigma_rels "
                f"{[round(power.gamma_to_sigma_rel(g), 6) for g in checked['hparams'].gammas]}), "
                f"this PostHocEMA tracks {len(self.gammas)}; build it with the saved sigma_rels."
            )
        return {**checked, "num_snapshots": check_saved_count(state, "num_snapshots")}

    def _restore(self, checked: dict) -> None:
        super()._restore(checked)
        self._snapshots = checked["num_snapshots"]


def _snapshot_group(names: list[str], specs) -> tuple:
    """The process group the writer thread's collectives run on, and its CPU device mesh,
    on which the staged shards are laid out. A gloo group of its own (made here, when
    every rank builds the averager), so the writer thread's collectives never interleave
    with the training thread's. The staged copies live on the CPU, so they need a CPU mesh
    of the same ranks as the parameters' mesh: that is FSDP2 over one 1-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    world = list(range(dist.get_world_size()))
    for name, spec in zip(names, specs):
        if spec is not None and (spec.mesh.ndim != 1 or spec.mesh.mesh.tolist() != world):
            raise BelayInputError(
                f"PostHocEMA's sharded snapshots need the profiles sharded over one 1-D mesh "
                f"of every rank (FSDP2 over the world, or shard_shadow=True with the default "
                f"group); {name} is laid out as {spec.describe()} (HSDP, 2-D meshes and "
                "subgroups are not supported yet). Use EMA or PowerEMA on this model, or a "
                "1-D mesh of every rank."
            )
    group = dist.new_group(backend="gloo")
    return group, DeviceMesh.from_group(group, "cpu")
