"""ATen's CPU capabilities (``ATEN_CPU_CAPABILITY``: ``default``, ``avx2``, ``avx512``),
which ATen reads once, when torch is imported; so each is tried in a process of its own.

Run as a script (tests/test_capabilities.py runs it under each capability the CPU has),
this module checks the torch and C++ backends against the reference and prints one JSON
object: the capability ATen runs, how its ``lerp`` rounds (``_fingerprints.lerp_rounding``),
and one row per call of every op, dtype pair, layout, hyperparameter form (number or
tensor) and non-finite policy, on fresh inputs with NaN and infinities in the weights:
a hash of the reference's results, whether each backend wrote the reference's bits, and
how far it is from them, in units in the last place (ulps) of the stored dtype at the
larger magnitude of the two values the op blends.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CAPABILITIES = ("default", "avx2", "avx512")

# Small tensors, with odd sizes and an empty one: the vector loops and their tails.
LAYOUTS = {"flat": (1027,), "list": (1, 31, 0, 257, 70)}
# The torch backend's chunk loop, which on real buffers starts at 128K elements, made to
# start at 256 so that these sizes cross chunks.
CHUNK = 256


def _child_env(capability: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


@functools.cache
def supported(capability: str) -> bool:
    """Whether ATen runs ``capability`` when asked to: it falls back to the best one the
    CPU has when asked for one it lacks (and on a CPU that is not x86)."""
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=_child_env(capability),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().lower() == capability


def run_under(capability: str) -> dict:
    """This script's report, computed in a process under ``capability``."""
    done = subprocess.run(
        [sys.executable, __file__],
        env=_child_env(capability),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout)


# --- the child ----------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each finite, non-negative float64
    ``magnitude``: the power of two of its binade (its float64 exponent bits alone) times
    2**-(mantissa bits), and at least the dtype's smallest subnormal. All of it exact."""
    from _fingerprints import _MANTISSA_BITS

    step = math.ldexp(1.0, -_MANTISSA_BITS[dtype])
    binade = (magnitude.contiguous().view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    return torch.clamp(binade * step, min=torch.finfo(dtype).smallest_normal * step)


def _distance_in_ulps(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    """The largest ``|got - want|`` in ulps of their dtype at ``scale``; inf where one is
    NaN and the other not, or where infinities differ."""
    g, w = got.double(), want.double()
    infinite = torch.isinf(g) | torch.isinf(w)
    if not torch.equal(torch.isnan(g), torch.isnan(w)) or not torch.equal(g[infinite], w[infinite]):
        return float("inf")
    finite = torch.isfinite(g) & torch.isfinite(w)
    if not finite.any():
        return 0.0
    error = (g[finite] - w[finite]).abs() / _ulp(scale[finite], got.dtype)
    return float(error.max())


def _calls(method: str, pair, as_tensor: bool):
    """The hyperparameters of each call: both sides of lerp's switch at 0.5, a copy
    (SWA's count 0) and a zero decay."""
    rate_dtype = torch.float64 if torch.float64 in pair else torch.float32

    def rate(x):
        return torch.tensor(x, dtype=rate_dtype) if as_tensor else x

    if method in ("ema", "multi_ema"):
        decays = (0.9, 0.3, 0.999, 0.0)
        if method == "ema":
            return [{"decay": rate(d)} for d in decays]
        return [{"decays": [rate(d) for d in decays[:3]]}, {"decays": [rate(0.6), rate(0.0)]}]
    if method == "swa":
        return [
            {"count": torch.tensor(c, dtype=torch.int64) if as_tensor else c} for c in (0, 1, 2, 6)
        ]
    if method == "belay":
        return [{"alpha": rate(a), "beta": rate(b)} for a, b in ((0.05, 0.6), (0.7, 0.2))]
    if method == "swap":
        return [{"inverse": False}, {"inverse": True}]
    return [{}]


def _pairs(method: str):
    from belay_kernels.methods import DTYPE_PAIRS
    from belay_kernels.reference import swap_supported

    return [p for p in DTYPE_PAIRS if method != "swap" or swap_supported(*p)]


def _case(method, pair, sizes, kwargs, policy, seed):
    """The call's inputs (fresh, with non-finite weights) and a runner per backend that
    returns what it wrote, and the magnitudes it blended per written tensor."""
    from _fingerprints import Inputs

    from belay_kernels import ops

    wd, sd = pair
    inputs = Inputs(seed)
    weights = inputs.fresh(sizes, wd, nonfinite=True)
    shadow = inputs.fresh(sizes, sd)
    profiles = [inputs.fresh(sizes, sd) for _ in kwargs.get("decays", ())]
    snapshot = inputs.fresh(sizes, sd)

    def arg(ts):
        return ts[0] if len(ts) == 1 else ts

    def clone(ts):
        return [t.clone() for t in ts]

    counted = {} if method in ("two_point", "swap") else {"nonfinite": policy}

    def run(backend):
        w, s, ps = clone(weights), clone(shadow), [clone(p) for p in profiles]
        skipped = torch.zeros((), dtype=torch.int64)
        extra = dict(counted, skipped=skipped) if counted else {}
        if method == "ema":
            ops.ema_update_(arg(s), arg(w), **kwargs, **extra, backend=backend)
            written = [(s, shadow, weights)]
        elif method == "swa":
            ops.swa_update_(arg(s), arg(w), **kwargs, **extra, backend=backend)
            written = [(s, shadow, weights)]
        elif method == "multi_ema":
            ops.multi_ema_update_([arg(p) for p in ps], arg(w), **kwargs, **extra, backend=backend)
            written = [(p, old, weights) for p, old in zip(ps, profiles)]
        elif method == "belay":
            ops.belay_step_(arg(w), arg(s), **kwargs, **extra, backend=backend)
            written = [(w, weights, shadow), (s, shadow, weights)]
        elif method == "two_point":
            out = [torch.zeros_like(t) for t in weights]
            ops.two_point_average(arg(w), arg(snapshot), out=arg(out), backend=backend)
            written = [(out, weights, snapshot)]
        else:
            ops.swap_(arg(w), arg(s), **kwargs, backend=backend)
            written = [(w, weights, shadow), (s, shadow, weights)]
        rows = []
        for new, a, b in written:
            for t, x, y in zip(new, a, b):
                x, y = x.double().abs(), y.double().abs()
                # the larger magnitude blended; a non-finite input gives no scale
                scale = torch.where(torch.isfinite(x) & torch.isfinite(y), torch.maximum(x, y), 0)
                rows.append((t, scale))
        return rows, int(skipped) if extra else 0

    return run


def _cases():
    """(name, method, dtype pair, sizes, hyperparameters, policy) of every call checked."""
    for method in ("ema", "swa", "belay", "two_point", "swap", "multi_ema"):
        counts = method not in ("two_point", "swap")
        for pair in _pairs(method):
            for layout, sizes in LAYOUTS.items():
                for form in ("number", "tensor") if counts else ("-",):
                    for policy in ("skip", "propagate") if counts else ("-",):
                        for kwargs in _calls(method, pair, form == "tensor"):
                            pair_name = "/".join(str(d).removeprefix("torch.") for d in pair)
                            name = f"{method} {pair_name} {layout} {form} {policy} {kwargs}"
                            yield name, method, pair, sizes, kwargs, policy


def _compare(got, want) -> dict:
    """``bits``: "equal", "nan-bits" (equal but for the bits of some NaNs) or "differ";
    ``ulps``: the largest distance of a written element, see :func:`_distance_in_ulps`."""
    from _fingerprints import quiet_nans_

    (got, got_skipped), (want, want_skipped) = got, want
    if got_skipped != want_skipped:
        return {"bits": "differ", "ulps": float("inf")}
    pairs = [(g, w) for (g, _), (w, _) in zip(got, want)]
    if all(torch.equal(_bits(g), _bits(w)) for g, w in pairs):
        bits = "equal"
    elif all(
        torch.equal(_bits(quiet_nans_(g.clone())), _bits(quiet_nans_(w.clone()))) for g, w in pairs
    ):
        bits = "nan-bits"
    else:
        bits = "differ"
    ulps = max(
        (_distance_in_ulps(g, w, scale) for (g, _), (w, scale) in zip(got, want)), default=0.0
    )
    return {"bits": bits, "ulps": ulps}


def report() -> dict:
    from _fingerprints import _bits as fingerprint_bits
    from _fingerprints import lerp_rounding

    from belay_kernels import backends
    from belay_kernels.backend import torch as torch_backend

    torch.set_num_threads(1)
    torch_backend.CPU_CHUNK = CHUNK
    compiled = ("cpp",) if backends()["cpp"].startswith("available") else ()
    rows = []
    for seed, (name, method, pair, sizes, kwargs, policy) in enumerate(_cases()):
        run = _case(method, pair, sizes, kwargs, policy, seed)
        want = run("reference")
        digest = hashlib.sha256()
        for t, _ in want[0]:
            digest.update(fingerprint_bits(t))
        row = {"case": name, "method": method, "pair": name.split()[1]}
        row["reference"] = digest.hexdigest()[:20]
        for backend in ("torch", *compiled):
            row[backend] = _compare(run(backend), want)
        rows.append(row)
    return {
        "capability": torch.backends.cpu.get_cpu_capability().lower(),
        "lerp": lerp_rounding(),
        "backends": ["torch", *compiled],
        "rows": rows,
    }


if __name__ == "__main__":
    print(json.dumps(report()))
