"""Post-hoc EMA (EDM2): track power-function EMA profiles, snapshot them during training,
and reconstruct the EMA of any other length afterwards.

    phema = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=500,
                       snapshot_dir="phema")
    for batch in loader:
        ...
        optimizer.step()
        phema.step()                    # every profile in one op call per flat buffer
    weights = reconstruct("phema", sigma_rel=0.07)   # after training: no model needed
    model.load_state_dict(weights)

The formulas are in :mod:`belay_kernels.power`. ``belay-kernels posthoc DIR --sigma-rel
0.07 --out FILE.pt`` is the command-line form of :func:`reconstruct`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import power
from ._checks import BelayInputError
from .averagers import Averager, check_saved_count
from .hparams import HparamAttribute, Hparams, check_every, set_converted

SNAPSHOT_KIND = "belay_kernels.posthoc snapshot"
SNAPSHOT_FORMAT = 1
SNAPSHOT_GLOB = "snapshot-*.pt"
_HEADER_KEYS = (
    "kind",
    "format",
    "index",
    "step",
    "gammas",
    "names",
    "shapes",
    "is_param",
    "profiles",
    "buffers",
)
_SNAPSHOT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


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
    snapshot_dtype: str = "float16"  # a name in _SNAPSHOT_DTYPES, as checkpoints store it
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
        if self.snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise BelayInputError(
                f"snapshot_dtype must be one of {list(_SNAPSHOT_DTYPES)}, got {self.snapshot_dtype!r}."
            )

    def to_state(self) -> dict:
        return {**super().to_state(), "gammas": list(self.gammas)}


class PostHocEMA(Averager):
    """K power-function EMA profiles (``sigma_rels``), updated together by one
    :func:`~belay_kernels.ops.multi_ema_update_` call per flat buffer, and every
    ``snapshot_every`` steps saved to ``snapshot_dir`` as one file holding all K profiles
    in ``snapshot_dtype`` (written to a temporary file, then renamed). :func:`reconstruct`
    turns the snapshots into the EMA of any other ``sigma_rel``.

    ``averaged(sigma_rel=...)`` swaps in one of the tracked profiles (default: the first).
    ``state_dict()`` carries the profiles and counters (the snapshots are files); a run
    resumed from it continues the snapshot numbering. Options as for every averager.
    """

    method = "PostHocEMA"
    _can_shard_shadow = False
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
        **options,
    ):
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
        super().__init__(module_or_params, **options)
        module = self._module
        self._buffer_names = {n for n, _ in module.named_buffers()} if module is not None else set()

    def _add_state(self) -> None:
        if any(t.specs is not None for t in self._tracks):
            raise BelayInputError("PostHocEMA does not support DTensor (FSDP2) parameters yet.")
        # profile 0 is the base class's shadow; the others start as copies of it
        for track in self._tracks:
            track.extra_profiles = [track.like_shadow(torch.clone) for _ in self.gammas[1:]]

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
        return _SNAPSHOT_DTYPES[self._hparams.snapshot_dtype]

    @snapshot_dtype.setter
    def snapshot_dtype(self, dtype) -> None:
        self._hparams = replace(self._hparams, snapshot_dtype=_dtype_name(dtype))

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

    def _advance(self) -> None:
        super()._advance()
        if self._steps % self.snapshot_every == 0:
            self._write_snapshot()

    # ---- snapshots ---------------------------------------------------------------------
    def _profile_buffers(self, k: int) -> list:
        """Profile ``k`` per track, laid out like the track's shadow."""
        return [t.shadow if k == 0 else t.extra_profiles[k - 1] for t in self._tracks]

    def _profile(self, k: int) -> list[torch.Tensor]:
        """Profile ``k`` per averaged tensor, in the order of names() (views)."""
        return self._in_caller_order(
            [t.views(b) for t, b in zip(self._tracks, self._profile_buffers(k))]
        )

    def _write_snapshot(self) -> None:
        index = self._snapshots + 1
        names = self.names()
        payload = {
            "kind": SNAPSHOT_KIND,
            "format": SNAPSHOT_FORMAT,
            "index": index,
            "step": self._steps,
            "gammas": list(self.gammas),
            "sigma_rels": self.sigma_rels,
            "names": names,
            "shapes": [list(v.shape) for v in self._profile(0)],
            "is_param": [n not in self._buffer_names for n in names],
            "profiles": [
                [v.detach().to("cpu", self.snapshot_dtype, copy=True) for v in self._profile(k)]
                for k in range(len(self.gammas))
            ],
            # the model's buffers as they are (BatchNorm statistics are not reconstructed)
            "buffers": {n: b.detach().to("cpu", copy=True) for n, b in self._module.named_buffers()}
            if self._module is not None
            else {},
        }
        _atomic_save(payload, self.snapshot_dir / f"snapshot-{index:06d}.pt")
        self._snapshots = index

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
        state = super().state_dict()
        state["num_snapshots"] = self._snapshots
        return state

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


def _atomic_save(obj, path: Path) -> None:
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
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- reconstruction -------------------------------------------------------------------
def read_snapshot(path, *, mmap: bool = False) -> dict:
    """One snapshot file, checked; ``mmap=True`` maps its tensors without reading them."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several kinds for a damaged zip
        raise BelayInputError(
            f"snapshot {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt. Delete it (the others still reconstruct) or restore it."
        ) from None
    if not isinstance(snap, dict) or snap.get("kind") != SNAPSHOT_KIND:
        raise BelayInputError(f"{str(path)!r} is not a PostHocEMA snapshot.")
    missing = [k for k in _HEADER_KEYS if k not in snap]
    if missing or snap["format"] != SNAPSHOT_FORMAT:
        raise BelayInputError(
            f"snapshot {str(path)!r} lacks {missing} or has format {snap.get('format')!r} "
            f"(expected {SNAPSHOT_FORMAT}); it is corrupt or from another version."
        )
    return snap


def snapshot_files(snapshot_dir) -> list[Path]:
    folder = Path(snapshot_dir)
    files = sorted(folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []
    if not files:
        raise BelayInputError(
            f"no snapshots ({SNAPSHOT_GLOB}) in {str(folder)!r}"
            + ("" if folder.is_dir() else " (no such folder)")
            + "; pass the snapshot_dir that PostHocEMA wrote."
        )
    return files


def plan(snapshot_dir, *, sigma_rel=None, gamma=None, step=None):
    """What a reconstruction reads: ``(files, headers, coefficients, target_step,
    target_gamma)``, ``coefficients[i][k]`` the weight of profile k of ``files[i]``. Every
    file's metadata is checked (tensors memory-mapped, not read)."""
    target_gamma = power.resolve_gamma(sigma_rel, gamma)
    files = snapshot_files(snapshot_dir)
    headers = []
    for path in files:
        snap = read_snapshot(path, mmap=True)
        headers.append({k: snap[k] for k in ("step", "gammas", "names", "shapes", "is_param")})
        del snap
    first = headers[0]
    for path, h in zip(files[1:], headers[1:]):
        if h["names"] != first["names"] or h["shapes"] != first["shapes"]:
            known = {(n, tuple(s)) for n, s in zip(first["names"], first["shapes"])}
            diff = [
                f"{n} {tuple(s)}"
                for n, s in zip(h["names"], h["shapes"])
                if (n, tuple(s)) not in known
            ] or ["the order"]
            raise BelayInputError(
                f"snapshot {str(path)!r} is of a different model than {str(files[0])!r}: "
                f"tensor names or shapes differ ({', '.join(map(str, diff[:3]))}, "
                f"{len(h['names'])} against {len(first['names'])} tensors). Keep one run's "
                "snapshots per folder."
            )
    steps = [h["step"] for h in headers]
    if step is None:
        step = max(steps)
    if step not in steps:
        shown = steps if len(steps) <= 8 else steps[:4] + ["..."] + steps[-3:]
        raise BelayInputError(
            f"there is no snapshot at step {step!r}; the snapshots are at steps {shown}. "
            "Pass one of them, or no step for the last."
        )
    used = [i for i, s in enumerate(steps) if s <= step]  # later ones reach past the target
    t = [steps[i] for i in used for _ in headers[i]["gammas"]]
    g = [gm for i in used for gm in headers[i]["gammas"]]
    x = power.coefficients(t, g, step, target_gamma)
    coeffs, j = [], 0
    for i in used:
        count = len(headers[i]["gammas"])
        coeffs.append(x[j : j + count].tolist())
        j += count
    return [files[i] for i in used], [headers[i] for i in used], coeffs, step, target_gamma


def reconstruct(
    snapshot_dir, *, sigma_rel=None, gamma=None, step=None, progress_bar: bool = False
) -> dict[str, torch.Tensor]:
    """The EMA with ``sigma_rel`` (or ``gamma``) at ``step`` (default: the last snapshot),
    as a state dict, from the snapshots alone (EDM2 Algorithm 3). The snapshot files are
    read one at a time and summed in fp32 (fp64 for fp64 snapshots), so memory is one
    model plus one snapshot. Buffers are the model's at the target step's snapshot: a
    least-squares combination could make a running variance negative."""
    files, headers, coeffs, target, _ = plan(
        snapshot_dir, sigma_rel=sigma_rel, gamma=gamma, step=step
    )
    from ._progress import progress

    names, is_param = headers[0]["names"], headers[0]["is_param"]
    sums: list[torch.Tensor] | None = None
    last = None
    with progress(len(files), "reading snapshots", enabled=progress_bar) as bar:
        for path, weights in zip(files, coeffs):
            bar.set_postfix_str(path.name)
            snap = read_snapshot(path)
            for w, profile in zip(weights, snap["profiles"]):
                if sums is None:
                    dtype = torch.float64 if profile[0].dtype == torch.float64 else torch.float32
                    sums = [torch.zeros(v.shape, dtype=dtype) for v in profile]
                for acc, v in zip(sums, profile):
                    acc.add_(v.to(acc.dtype), alpha=w)
            if snap["step"] == target:
                last = snap
            bar.update(1)
    out = {n: v for n, v, p in zip(names, sums, is_param) if p}
    out.update(last["buffers"])
    return out


# ---- the command ----------------------------------------------------------------------
def _plot(path, files, headers, coeffs, target, target_gamma) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau = np.linspace(0, target, 2000)
    wanted = power.profile(tau, target, target_gamma)
    got = sum(
        c * power.profile(tau, h["step"], g)
        for h, cs in zip(headers, coeffs)
        for c, g in zip(cs, h["gammas"])
    )
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(
        tau,
        wanted,
        "k-",
        lw=2,
        label=f"target: sigma_rel {power.gamma_to_sigma_rel(target_gamma):.4g}",
    )
    ax.plot(tau, got, "C1--", lw=1.5, label=f"reconstructed from {len(files)} snapshots")
    ax.set(xlabel="training step", ylabel="weight per step", title=f"EMA profile at step {target}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="belay-kernels posthoc",
        description="Reconstruct the EMA of any sigma_rel from the snapshots PostHocEMA "
        "wrote (EDM2's post-hoc EMA) and save it as a state dict.",
    )
    parser.add_argument("snapshot_dir", metavar="SNAPSHOT_DIR")
    parser.add_argument(
        "--sigma-rel",
        type=float,
        required=True,
        help=f"the EMA's relative width, in (0, {power.SIGMA_REL_MAX:.4f})",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="a snapshot's step (default: the last snapshot)"
    )
    parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to save the weights")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the target profile and the reconstructed one",
    )
    args = parser.parse_args(argv)
    try:
        weights = reconstruct(
            args.snapshot_dir, sigma_rel=args.sigma_rel, step=args.step, progress_bar=True
        )
        if args.plot:
            _plot(args.plot, *plan(args.snapshot_dir, sigma_rel=args.sigma_rel, step=args.step))
    except BelayInputError as exc:
        parser.exit(2, f"belay-kernels posthoc: {exc}\n")
    _atomic_save(weights, Path(args.out))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
