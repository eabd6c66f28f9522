"""Fingerprints of every op's results on every backend available here: a hash of the
bits each op writes over a few steps of fixed pseudo-random data, per backend, method,
dtype pair, layout (one flat tensor or a list) and variant (hyperparameters as numbers
or tensors, an out-of-range tensor, the propagate policy).

tests/fingerprints.json holds the hashes recorded from the code before a refactoring;
test_fingerprints.py recomputes them, so a change of even one bit in any result shows.
Re-record only when a change of results is intended and explained:

    python tests/_fingerprints.py --record          (all backends, ~1-2 min)

The Triton backend runs under its interpreter (TRITON_INTERPRET=1, set before triton is
imported), so each backend is computed in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from belay_kernels.methods import DTYPE_PAIRS

HERE = Path(__file__).resolve().parent
RECORD = HERE / "fingerprints.json"
BACKENDS = ("torch", "cpp", "grid", "triton")

PAIRS = DTYPE_PAIRS
LAYOUTS = {"flat": (4099,), "list": (1, 31, 0, 1009, 70)}
STEPS = 4
NONFINITE_STEP = 1


def _pair_name(pair) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in pair)


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view).numpy().tobytes()


def _fresh(sizes, dtype, gen, nonfinite=False):
    out = []
    for n in sizes:
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        v = v * torch.exp(torch.randn(n, generator=gen, dtype=torch.float64))
        if nonfinite and n >= 3:
            where = torch.randperm(n, generator=gen)[: max(3, n // 50)]
            v[where[0::3]], v[where[1::3]], v[where[2::3]] = (
                float("nan"),
                float("inf"),
                -float("inf"),
            )
        out.append(v.to(dtype))
    return out


def _arg(tensors):
    return tensors[0] if len(tensors) == 1 else tensors


def _variants(method):
    if method == "ema":
        return {
            "number": {},
            "tensor": {"tensor": True},
            "bad-tensor": {"bad": True},
            "propagate": {"nonfinite": "propagate"},
            "decay-0": {"decay": 0.0},
        }
    if method == "swa":
        return {
            "number": {},
            "tensor": {"tensor": True},
            "bad-tensor": {"bad": True},
            "propagate": {"nonfinite": "propagate"},
        }
    if method == "belay":
        return {
            "number": {},
            "tensor": {"tensor": True},
            "bad-tensor": {"bad": True},
            "propagate": {"nonfinite": "propagate"},
            "beta-1": {"beta": 1.0},
        }
    if method == "swap":
        return {"round-trip": {}}
    return {"plain": {}}


def _run(method, backend, pair, sizes, variant, seed):
    from belay_kernels import ops

    gen = torch.Generator().manual_seed(seed)
    wd, sd = pair
    shadow = _fresh(sizes, sd, gen)
    weights = _fresh(sizes, wd, gen)
    skipped = torch.zeros((), dtype=torch.int64)
    policy = variant.get("nonfinite", "skip")
    digest = hashlib.sha256()

    def hyper(value, kind):
        if variant.get("bad"):
            value = -1 if kind == "count" else float("nan")
        if variant.get("tensor") or variant.get("bad"):
            return torch.tensor(value, dtype=torch.int64 if kind == "count" else torch.float64)
        return value

    for step in range(STEPS):
        incoming = _fresh(sizes, wd, gen, nonfinite=step == NONFINITE_STEP)
        if method == "ema":
            decay = variant.get("decay", (0.9, 0.3, 0.999, 0.6)[step])
            ops.ema_update_(
                _arg(shadow),
                _arg(incoming),
                decay=hyper(decay, "rate"),
                nonfinite=policy,
                skipped=skipped,
                backend=backend,
            )
        elif method == "swa":
            ops.swa_update_(
                _arg(shadow),
                _arg(incoming),
                count=hyper(step, "count"),
                nonfinite=policy,
                skipped=skipped,
                backend=backend,
            )
        elif method == "belay":
            for w, change in zip(weights, incoming):
                w.add_(change * 1e-2)
            alpha = (0.05, 0.7, 0.3, 0.01)[step]
            beta = variant.get("beta", (0.6, 0.2, 0.5, 0.05)[step])
            ops.belay_step_(
                _arg(weights),
                _arg(shadow),
                alpha=hyper(alpha, "rate"),
                beta=hyper(beta, "rate"),
                nonfinite=policy,
                skipped=skipped,
                backend=backend,
            )
        elif method == "two_point":
            snapshot = _fresh(sizes, sd, gen)
            out = [torch.empty_like(t) for t in incoming]
            ops.two_point_average(_arg(incoming), _arg(snapshot), out=_arg(out), backend=backend)
            for t in out:
                digest.update(_bits(t))
        elif method == "swap":
            ops.swap_(_arg(incoming), _arg(shadow), backend=backend)
            for t in incoming + shadow:
                digest.update(_bits(t))
            ops.swap_(_arg(incoming), _arg(shadow), inverse=True, backend=backend)
    for t in shadow + weights:
        digest.update(_bits(t))
    digest.update(str(int(skipped)).encode())
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def _grid():
    """The compiled CUDA bodies on a simulated grid of 3 blocks of 32 threads."""
    from belay_kernels.extension._entry_points import simulated_grid as grid

    with grid(3, 32, 64):
        yield


def compute(backend: str) -> dict[str, str]:
    torch.set_num_threads(1)
    name = "cpp" if backend == "grid" else backend
    context = _grid() if backend == "grid" else contextlib.nullcontext()
    out = {}
    with context:
        for method in ("ema", "swa", "belay", "two_point", "swap"):
            for pair in PAIRS:
                if (
                    method == "swap"
                    and pair[0] != pair[1]
                    and pair != (torch.bfloat16, torch.float32)
                ):
                    continue
                for layout, sizes in LAYOUTS.items():
                    for variant_name, variant in _variants(method).items():
                        key = f"{method} {_pair_name(pair)} {layout} {variant_name}"
                        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
                        out[f"{backend} {key}"] = _run(method, name, pair, sizes, variant, seed)
    return out


def compute_in_subprocess(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    # The checkout's package, not whichever one is installed: the script's own folder
    # (tests/) comes first on the child's sys.path, not the working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, __file__, "--backend", backend],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(compute(args.backend)))
        return
    record = {}
    for backend in BACKENDS:
        record.update(compute_in_subprocess(backend))
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(record)} fingerprints written to {RECORD}")


if __name__ == "__main__":
    main()
