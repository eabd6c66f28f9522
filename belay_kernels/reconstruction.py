"""Reconstruction (EDM2 Algorithm 3): the EMA of any ``sigma_rel`` from PostHocEMA's
snapshots alone, in one process or with each rank of a process group summing only its
own chunks, and ``belay-kernels posthoc``, its command. The snapshots' layouts and
checksums are in :mod:`belay_kernels.snapshots`, the formulas in :mod:`belay_kernels.power`.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed, power, snapshots
from ._checks import BelayInputError


def read_snapshot(path, *, mmap: bool = False) -> dict:
    """One snapshot file, its header checked; ``mmap=True`` maps its tensors without reading them."""
    return snapshots.read_file(path, mmap=mmap)


def snapshot_files(snapshot_dir) -> list[Path]:
    """The complete snapshots in ``snapshot_dir``, files and folders, in order."""
    found = snapshots.complete(snapshot_dir)
    if not found:
        folder = Path(snapshot_dir)
        raise BelayInputError(
            f"no snapshots (snapshot-NNNNNN.pt or snapshot-NNNNNN/) in {str(folder)!r}"
            + ("" if folder.is_dir() else " (no such folder)")
            + "; pass the snapshot_dir that PostHocEMA wrote."
        )
    return found


def _header(path: Path) -> dict:
    if path.is_dir():
        return snapshots.read_folder_header(path)
    snap = snapshots.read_file(path, mmap=True)  # tensors mapped, not read
    return {k: v for k, v in snap.items() if k not in ("profiles", "buffers")}


def _checked_headers(snapshot_dir) -> tuple[list[Path], list[dict]]:
    """The complete snapshots in ``snapshot_dir`` and their headers, all of one model."""
    files = snapshot_files(snapshot_dir)
    headers = [_header(path) for path in files]
    _check_same_model(files, headers)
    return files, headers


def _check_same_model(files, headers) -> None:
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


def _coefficients(headers, step, target_gamma) -> tuple[list[int], list[list[float]], int]:
    """(indices of the snapshots used, each one's coefficient per profile, target step)."""
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
    return used, coeffs, step


def plan(snapshot_dir, *, sigma_rel=None, gamma=None, step=None):
    """What a reconstruction reads: ``(files, headers, coefficients, target_step,
    target_gamma)``, ``coefficients[i][k]`` the weight of profile k of ``files[i]``. Every
    snapshot's header is checked (tensors are not read)."""
    target_gamma = power.resolve_gamma(sigma_rel, gamma)
    files, headers = _checked_headers(snapshot_dir)
    used, coeffs, step = _coefficients(headers, step, target_gamma)
    return [files[i] for i in used], [headers[i] for i in used], coeffs, step, target_gamma


def reconstruct(
    snapshot_dir,
    *,
    sigma_rel=None,
    gamma=None,
    step=None,
    process_group=None,
    progress_bar: bool = False,
) -> dict[str, torch.Tensor]:
    """The EMA with ``sigma_rel`` (or ``gamma``) at ``step`` (default: the last snapshot),
    as a state dict, from the snapshots alone (EDM2 Algorithm 3); either layout, written by
    any number of ranks.

    - In one process (``process_group=None``, also inside a distributed job) the result
      holds whole tensors.
    - With ``process_group`` (every rank of it calls this), each rank reads and sums only
      its dim-0 chunk of each tensor (DTensor's ``Shard(0)``), and the result holds
      DTensors on a CPU mesh of those ranks (a gloo group of the same ranks, made by each
      call, carries the reading's collectives): :func:`write_dcp` saves them as they are,
      :func:`export` gathers them into one file.

    Snapshots are read one at a time and summed in fp32 (fp64 for fp64 snapshots), so
    memory is one model (or chunk) plus one snapshot's. Every tensor's checksum is verified
    as it is read; a damaged snapshot is refused with its name, and leftovers of writes
    that did not finish are skipped with an :class:`~belay_kernels.snapshots.IncompleteSnapshotWarning`.
    Buffers are the model's at the target step's snapshot: a least-squares combination
    could make a running variance negative."""
    return reconstruct_many(
        snapshot_dir,
        [power.resolve_gamma(sigma_rel, gamma)],
        step=step,
        process_group=process_group,
        progress_bar=progress_bar,
        as_gammas=True,
    )[0]


def reconstruct_many(
    snapshot_dir,
    sigma_rels,
    *,
    step=None,
    process_group=None,
    progress_bar: bool = False,
    as_gammas: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """:func:`reconstruct` for several ``sigma_rels`` (or gammas, ``as_gammas=True``),
    reading each snapshot once."""
    from ._progress import progress

    gammas = [
        power.check_gamma(v) if as_gammas else power.sigma_rel_to_gamma(v) for v in sigma_rels
    ]
    snapshots.warn_incomplete(snapshot_dir)
    files, headers = _checked_headers(snapshot_dir)
    plans = [_coefficients(headers, step, g) for g in gammas]
    target = plans[0][2]
    weight = {}  # (snapshot index, target) -> coefficients
    for t, (used, coeffs, _) in enumerate(plans):
        for i, c in zip(used, coeffs):
            weight[i, t] = c
    reading = sorted({i for used, _, _ in plans for i in used})
    layout = _Layout(headers[0], process_group)
    sums: list[list[torch.Tensor]] | None = None
    last = None
    with progress(len(reading), "reading snapshots", enabled=progress_bar) as bar:
        for i in reading:
            bar.set_postfix_str(files[i].name)
            snap = _Snapshot(files[i], headers[i], layout)
            for k in range(len(headers[i]["gammas"])):
                profile = snap.profile(k)
                if sums is None:
                    dtype = torch.float64 if profile[0].dtype == torch.float64 else torch.float32
                    sums = [[torch.zeros(v.shape, dtype=dtype) for v in profile] for _ in gammas]
                for t in range(len(gammas)):
                    if (i, t) in weight:
                        for acc, v in zip(sums[t], profile):
                            acc.add_(v.to(acc.dtype), alpha=weight[i, t][k])
            if headers[i]["step"] == target:
                last = snap.buffers()
            bar.update(1)
    names, is_param = headers[0]["names"], headers[0]["is_param"]
    return [
        {
            **{n: layout.wrap(j, v) for j, (n, v, p) in enumerate(zip(names, per, is_param)) if p},
            **last,
        }
        for per in sums
    ]


class _Layout:
    """Which part of each tensor this process reconstructs: all of it, or under a process
    group its rank's dim-0 chunk (0-d tensors whole on every rank)."""

    def __init__(self, header: dict, process_group):
        self.shapes = [tuple(s) for s in header["shapes"]]
        self.group = self.mesh = None
        if process_group is None:
            self.rows = [None] * len(self.shapes)
            return
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        ranks = dist.get_process_group_ranks(process_group)
        # DCP's collectives and the CPU tensors want gloo, whatever the caller's group runs
        self.group = dist.new_group(ranks=ranks, backend="gloo")
        self.mesh = DeviceMesh.from_group(self.group, "cpu")
        rank, world = dist.get_rank(self.group), len(ranks)
        self.rows = [distributed.row_chunk(s[0], rank, world) if s else None for s in self.shapes]
        self.first = rank == 0

    def offsets(self, j: int) -> tuple[int, ...]:
        rows = self.rows[j]
        return (rows[0] if rows else 0,) + (0,) * max(0, len(self.shapes[j]) - 1)

    def counts(self, j: int) -> bool:
        """Whether this rank adds its part of tensor j's checksum (a whole tensor: rank 0)."""
        return self.group is None or self.rows[j] is not None or self.first

    def wrap(self, j: int, value: torch.Tensor):
        if self.group is None:
            return value
        return distributed.row_spec(self.shapes[j], self.mesh).wrap(value)

    def combined(self, parts: list[int]) -> list[int]:
        if self.group is None:
            return parts
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, parts, group=self.group)
        return [snapshots.combine(column) for column in zip(*gathered)]


class _Snapshot:
    """One complete snapshot, either layout, read part by part as the layout says, each
    part's checksum verified."""

    def __init__(self, path: Path, header: dict, layout: _Layout):
        self.path, self.header, self.layout = path, header, layout
        self._file = None if path.is_dir() else snapshots.read_file(path, mmap=True)
        self._sums = header.get("checksums")  # None in format-1 files

    def profile(self, k: int) -> list[torch.Tensor]:
        layout = self.layout
        if self._file is not None:
            whole = self._file["profiles"][k]
            values = [v if r is None else v.narrow(0, *r) for v, r in zip(whole, layout.rows)]
        else:
            dtype = snapshots.DTYPES[self.header["dtype"]]
            values = self._load(f"profile_{k}", [dtype] * len(layout.shapes))
        if self._sums is not None:
            parts = [
                snapshots.checksum(v, shape, layout.offsets(j)) if layout.counts(j) else 0
                for j, (v, shape) in enumerate(zip(values, layout.shapes))
            ]
            for j, (got, saved) in enumerate(
                zip(layout.combined(parts), self._sums["profiles"][k])
            ):
                if got != saved:
                    raise snapshots.damaged(
                        self.path, f"{self.header['names'][j]!r} in profile {k}"
                    )
        return values

    def buffers(self) -> dict[str, torch.Tensor]:
        if self._file is not None:
            values = self._file["buffers"]
        else:
            names = list(self.header["buffer_shapes"])
            if not names:
                return {}
            dtypes = [getattr(torch, self.header["buffer_dtypes"][n]) for n in names]
            values = dict(zip(names, self._load("buffers", dtypes, names)))
        if self._sums is not None:
            for name, value in values.items():
                if snapshots.checksum(value, value.shape) != self._sums["buffers"][name]:
                    raise snapshots.damaged(self.path, f"buffer {name!r}")
        return {n: v.clone() for n, v in values.items()}

    def _load(self, key: str, dtypes, names=None) -> list[torch.Tensor]:
        """Tensors under ``key`` of a DCP folder: the layout's parts of the profiles, or
        the whole buffers (``names`` given)."""
        import torch.distributed.checkpoint as dcp

        layout = self.layout
        templates = {}
        if names is not None:
            shapes = self.header["buffer_shapes"]
            templates = {n: torch.empty(shapes[n], dtype=d) for n, d in zip(names, dtypes)}
        else:
            for j, (name, shape, dtype) in enumerate(
                zip(self.header["names"], layout.shapes, dtypes)
            ):
                rows = layout.rows[j]
                if rows is None:
                    templates[name] = torch.empty(shape, dtype=dtype)
                else:
                    local = torch.empty((rows[1], *shape[1:]), dtype=dtype)
                    templates[name] = distributed.row_spec(shape, layout.mesh).wrap(local)
        state = {key: templates}
        try:
            with (
                warnings.catch_warnings()
            ):  # DCP warns that one process reads alone: we asked it to
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(
                    state,
                    checkpoint_id=str(self.path),
                    process_group=layout.group,
                    no_dist=layout.group is None,
                )
        except Exception as exc:  # DCP raises several kinds (wrapped per rank) for a damaged file
            raise BelayInputError(
                f"snapshot {str(self.path)!r} cannot be read ({type(exc).__name__}: "
                f"{str(exc)[:300]}); it is damaged. Delete it (the others still reconstruct) "
                "or restore it."
            ) from None
        return [t.to_local() if distributed.is_dtensor(t) else t for t in state[key].values()]


def write_dcp(weights: dict, checkpoint_id) -> None:
    """Save :func:`reconstruct`'s result as a ``torch.distributed.checkpoint`` folder: under
    a process group each rank writes its own chunks (every rank calls this)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(weights), checkpoint_id=str(checkpoint_id))


def export(weights: dict, path=None, *, rank: int = 0) -> dict:
    """:func:`reconstruct`'s result as a plain state dict of whole tensors (DTensors are
    gathered: a collective every rank joins), saved with ``torch.save`` to ``path`` by
    ``rank`` when a path is given; ``model.load_state_dict`` takes it in one process."""
    import torch.distributed as dist

    out = {n: v.full_tensor() if distributed.is_dtensor(v) else v for n, v in weights.items()}
    writes = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == rank
    if path is not None and writes:
        snapshots.atomic_save(out, Path(path))
    return out


# ---- the command ----------------------------------------------------------------------
def _plot(path, snapshot_dir, sigma_rels, step, results) -> None:
    """The target profiles and their reconstructions; with several sigma_rels also how far
    the reconstructed weights lie from the first one's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(sigma_rels) > 1
    fig, axes = plt.subplots(1, 2 if several else 1, figsize=(13 if several else 8, 4))
    ax = axes[0] if several else axes
    for c, sigma_rel in enumerate(sigma_rels):
        files, headers, coeffs, target, target_gamma = plan(
            snapshot_dir, sigma_rel=sigma_rel, step=step
        )
        tau = np.linspace(0, target, 2000)
        got = sum(
            x * power.profile(tau, h["step"], g)
            for h, xs in zip(headers, coeffs)
            for x, g in zip(xs, h["gammas"])
        )
        ax.plot(
            tau,
            power.profile(tau, target, target_gamma),
            f"C{c}-",
            lw=2,
            label=f"sigma_rel {sigma_rel:.4g}",
        )
        ax.plot(tau, got, "k--", lw=1)
    ax.set(
        xlabel="training step",
        ylabel="weight per step",
        title=f"EMA profiles at step {target} (dashed: from {len(files)} snapshots)",
    )
    ax.legend()
    if several:
        base = results[0]
        names = [n for n in base if base[n].is_floating_point()]
        norm = math.sqrt(sum(float(base[n].double().square().sum()) for n in names)) or 1.0
        moved = [
            math.sqrt(sum(float((r[n].double() - base[n].double()).square().sum()) for n in names))
            / norm
            for r in results
        ]
        axes[1].plot(sigma_rels, moved, "o-")
        axes[1].set(
            xlabel="sigma_rel",
            ylabel="relative L2 distance",
            title=f"reconstructed weights against sigma_rel {sigma_rels[0]:.4g}",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_name(sigma_rel: float) -> str:
    """The file one sigma_rel's weights get when the command writes several."""
    return f"sigma_rel-{sigma_rel:.6g}.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="belay-kernels posthoc",
        description="Reconstruct the EMA of any sigma_rel from the snapshots PostHocEMA "
        "wrote (EDM2's post-hoc EMA), from files or sharded checkpoint folders, and save "
        "each as a state dict.",
    )
    parser.add_argument("snapshot_dir", metavar="SNAPSHOT_DIR")
    parser.add_argument(
        "--sigma-rel",
        type=float,
        nargs="+",
        required=True,
        help=f"one or more relative widths, each in (0, {power.SIGMA_REL_MAX:.4f}); the "
        "snapshots are read once for all of them",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="a snapshot's step (default: the last snapshot)"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="where to save the weights: a FILE.pt for one sigma_rel, a folder for several "
        "(one sigma_rel-S.pt each)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the target profiles and the reconstructed ones, and with several "
        "sigma_rels how the weights move with sigma_rel",
    )
    args = parser.parse_args(argv)
    try:
        results = reconstruct_many(
            args.snapshot_dir, args.sigma_rel, step=args.step, progress_bar=True
        )
        if args.plot:
            _plot(args.plot, args.snapshot_dir, args.sigma_rel, args.step, results)
    except BelayInputError as exc:
        parser.exit(2, f"belay-kernels posthoc: {exc}\n")
    if len(results) == 1:
        written = [Path(args.out)]
    else:
        written = [Path(args.out) / output_name(s) for s in args.sigma_rel]
    for path, weights in zip(written, results):
        snapshots.atomic_save(weights, path)
    shown = ", ".join(map(str, written[:3])) + (" ..." if len(written) > 3 else "")
    print(f"wrote {shown}" + (f" and {args.plot}" if args.plot else ""))
    return 0
