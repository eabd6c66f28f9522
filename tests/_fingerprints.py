"""Fingerprints of every op's results on every backend available here: a hash of the
bits each op writes over a few steps of fixed pseudo-random data, per backend, method,
dtype pair, layout (one flat tensor or a list) and variant (hyperparameters as numbers
or tensors, an out-of-range tensor, the propagate policy).

tests/fingerprints.json holds the hashes recorded from the code before a refactoring;
test_fingerprints.py recomputes them, so a change of even one bit in any result shows.
Re-record only when a change of results is intended and explained:

    python tests/_fingerprints.py --record          (all backends, under a minute)

The Triton backend runs under its interpreter (TRITON_INTERPRET=1, set before triton is
imported), so each backend is computed in its own process.

The inputs are the same bits on every machine (tests/test_fingerprint_inputs.py checks
it). They were torch.randn and torch.exp once, whose last bits come from the platform's
math library and vector code, so a new machine saw every float64 result "change". Now
each value is an integer mantissa of its dtype's own precision times a power of two from
a table, both taken from a counter-based integer hash (SplitMix64's mixing function, in
numpy's uint64 arithmetic, which wraps modulo 2**64 by definition): no transcendental
function, no platform RNG path, and no rounding when the float64 values are converted to
the tensor's dtype. NaN and the infinities are written as bit patterns, because the NaN
a conversion or an addition stores into bf16 differs between ATen's scalar and vector
code.

The torch backend is the reference's own torch ops, and ATen's ``lerp`` rounds
differently under different CPU capabilities: its AVX2 and AVX-512 kernels fuse the
multiply-add (one rounding), its default kernels round the product first. Its results
are recorded under both: as ``torch`` where the lerp fuses and as ``torch-unfused``
where it does not (``ATEN_CPU_CAPABILITY=default``); :func:`lerp_rounding` tells which
applies in a process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from belay_kernels.methods import DTYPE_PAIRS

HERE = Path(__file__).resolve().parent
RECORD = HERE / "fingerprints.json"
BACKENDS = ("torch", "cpp", "grid", "triton")

PAIRS = DTYPE_PAIRS
LAYOUTS = {"flat": (4099,), "list": (1, 31, 0, 1009, 70)}
STEPS = 4
NONFINITE_STEP = 1
# The record's name for the torch backend's results where ATen's lerp rounds its product
# before the add (see lerp_rounding); "torch" names them where the multiply-add is fused.
TORCH_UNFUSED = "torch-unfused"


def _pair_name(pair) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in pair)


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view).numpy().tobytes()


# --- inputs that are the same bits on every machine ------------------------------------

# SplitMix64 (Steele, Lea and Flood, 2014): the n-th word of a stream is the mixing
# function applied to seed + (n + 1) * GOLDEN, so a word depends only on its seed and its
# index. numpy's uint64 arrays wrap modulo 2**64, as the function expects.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = (
    (np.uint64(30), np.uint64(0xBF58476D1CE4E5B9)),
    (np.uint64(27), np.uint64(0x94D049BB133111EB)),
)
_LAST_SHIFT = np.uint64(31)

# Each value is sign * mantissa * 2**e with a binade e picked by four bits of its word:
# 16 binades from 2**-8 to 2**7, so the ops round on many exponents and on both signs, as
# they did with randn * exp(randn). Powers of two from math.ldexp are exact.
_BINADES = tuple(range(-8, 8))
# Stored mantissa bits (the leading one not counted) of each floating dtype.
_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def _words(seed: int, first: int, n: int) -> np.ndarray:
    """Words ``first`` .. ``first + n - 1`` of the stream ``seed``, as uint64."""
    z = np.uint64(seed) + (np.arange(first, first + n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    for shift, multiplier in _MIX:
        z = (z ^ (z >> shift)) * multiplier
    return z ^ (z >> _LAST_SHIFT)


def _values(words: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """One finite, non-zero value of ``dtype`` per word, exact in it: a mantissa of the
    dtype's precision (p bits, the leading one included) from the word's low bits, times a
    power of two from the table, negative when the word's top bit is set."""
    precision = _MANTISSA_BITS[dtype] + 1
    mantissa = (words & np.uint64(2**52 - 1)) | np.uint64(2**52)  # 53 bits, top one set
    mantissa = mantissa >> np.uint64(53 - precision)
    scale = np.array([math.ldexp(1.0, e - (precision - 1)) for e in _BINADES])
    binade = ((words >> np.uint64(59)) & np.uint64(15)).astype(np.intp)
    # below 2**53, so exact in float64, and scaling by a power of two is exact too
    magnitude = mantissa.astype(np.float64) * scale[binade]
    value = np.where(words >> np.uint64(63) == 1, -magnitude, magnitude)
    return torch.from_numpy(value).to(dtype)  # exact: the value has the dtype's precision


def _special_bits(dtype: torch.dtype) -> tuple[int, int, int]:
    """The quiet NaN, +inf and -inf of an IEEE ``dtype`` as signed integers of its width."""
    width = torch.finfo(dtype).bits
    mantissa_bits = _MANTISSA_BITS[dtype]
    inf = (2 ** (width - 1 - mantissa_bits) - 1) << mantissa_bits
    nan = inf | 1 << (mantissa_bits - 1)
    negative_inf = inf - 2 ** (width - 1)  # the sign bit set, read as a signed integer
    return nan, inf, negative_inf


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[torch.finfo(t.dtype).bits])


class Inputs:
    """The fixed pseudo-random tensors of one fingerprint case, drawn in order from the
    stream ``seed``: each call takes the stream's next words."""

    def __init__(self, seed: int):
        self.seed = seed
        self.drawn = 0

    def _next_words(self, n: int) -> np.ndarray:
        words = _words(self.seed, self.drawn, n)
        self.drawn += n
        return words

    def fresh(self, sizes, dtype: torch.dtype, nonfinite: bool = False) -> list[torch.Tensor]:
        """One tensor of ``dtype`` per size; with ``nonfinite``, max(3, n // 50) elements of
        each tensor of 3 or more elements (at positions drawn from the stream) are NaN, inf
        and -inf in turn."""
        out = []
        for n in sizes:
            v = _values(self._next_words(n), dtype)
            if nonfinite and n >= 3:
                # the positions of the smallest words of n more; a stable sort breaks ties
                order = np.argsort(self._next_words(n), kind="stable")[: max(3, n // 50)]
                where = torch.from_numpy(order.astype(np.int64))
                bits = _int_view(v)
                for k, pattern in enumerate(_special_bits(dtype)):
                    bits[where[k::3]] = pattern
            out.append(v)
        return out


def quiet_nans_(t: torch.Tensor) -> torch.Tensor:
    """Every NaN of ``t`` made the dtype's positive quiet NaN, in place. The NaN that torch
    arithmetic stores into bf16 is 0x7FC0 from ATen's scalar code and 0xFFFF from its AVX2
    and AVX-512 code, so the harness's own arithmetic must not pass it on."""
    _int_view(t)[torch.isnan(t)] = _special_bits(t.dtype)[0]
    return t


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
    """The hash of what ``method`` writes on ``backend`` over STEPS steps. With backend
    None no op runs, and the hash is of the inputs: every tensor drawn, and the weights
    after each of BELAY's optimizer steps."""
    from belay_kernels import ops

    inputs = Inputs(seed)
    drawn = hashlib.sha256()

    def fresh(dtype, nonfinite=False):
        tensors = inputs.fresh(sizes, dtype, nonfinite)
        for t in tensors:
            drawn.update(_bits(t))
        return tensors

    def run(op, *args, **kwargs):
        if backend is not None:
            op(*args, **kwargs, backend=backend)

    wd, sd = pair
    shadow = fresh(sd)
    weights = fresh(wd)
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
        incoming = fresh(wd, nonfinite=step == NONFINITE_STEP)
        if method == "ema":
            decay = variant.get("decay", (0.9, 0.3, 0.999, 0.6)[step])
            run(
                ops.ema_update_,
                _arg(shadow),
                _arg(incoming),
                decay=hyper(decay, "rate"),
                nonfinite=policy,
                skipped=skipped,
            )
        elif method == "swa":
            run(
                ops.swa_update_,
                _arg(shadow),
                _arg(incoming),
                count=hyper(step, "count"),
                nonfinite=policy,
                skipped=skipped,
            )
        elif method == "belay":
            # the optimizer's step; a NaN it makes (or meets in weights an earlier step
            # left NaN) is stored with the bits of whichever ATen loop ran, so it is
            # made the one quiet NaN: the inputs stay the same bits everywhere
            for w, change in zip(weights, incoming):
                quiet_nans_(w.add_(change * 1e-2))
                drawn.update(_bits(w))
            alpha = (0.05, 0.7, 0.3, 0.01)[step]
            beta = variant.get("beta", (0.6, 0.2, 0.5, 0.05)[step])
            run(
                ops.belay_step_,
                _arg(weights),
                _arg(shadow),
                alpha=hyper(alpha, "rate"),
                beta=hyper(beta, "rate"),
                nonfinite=policy,
                skipped=skipped,
            )
        elif method == "two_point":
            snapshot = fresh(sd)
            out = [torch.zeros_like(t) for t in incoming]
            run(ops.two_point_average, _arg(incoming), _arg(snapshot), out=_arg(out))
            for t in out:
                digest.update(_bits(t))
        elif method == "swap":
            run(ops.swap_, _arg(incoming), _arg(shadow))
            for t in incoming + shadow:
                digest.update(_bits(t))
            run(ops.swap_, _arg(incoming), _arg(shadow), inverse=True)
    if backend is None:
        return drawn.hexdigest()[:20]
    for t in shadow + weights:
        digest.update(_bits(t))
    digest.update(str(int(skipped)).encode())
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def _grid():
    """The compiled CUDA bodies on a simulated grid of 3 blocks of 32 threads."""
    from _grid import simulated_grid

    with simulated_grid(3, 32, 64):
        yield


def lerp_rounding() -> str:
    """How ATen's ``lerp`` rounds in this process: "fused" where it computes
    ``start + weight * (end - start)`` with one fused multiply-add (its AVX2 and AVX-512
    kernels), "unfused" where it rounds the product first (its default kernels, as
    separate ops do), "mixed" where float32 and float64 disagree."""
    kinds = set()
    for dtype in (torch.float32, torch.float64):
        inputs = Inputs(1)
        start, end = inputs.fresh((1027,), dtype) + inputs.fresh((1027,), dtype)
        separate = start + 0.3 * (end - start)  # three kernels, three roundings
        kinds.add("unfused" if torch.equal(torch.lerp(start, end, 0.3), separate) else "fused")
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _label(backend: str) -> str:
    """The name of ``backend``'s results in the record, in this process."""
    if backend != "torch":
        return backend
    return {"fused": "torch", "unfused": TORCH_UNFUSED}.get(lerp_rounding(), "torch-mixed")


def compute(backend: str) -> dict[str, str]:
    """Every case's hash on ``backend``, or of its inputs alone for "inputs"."""
    torch.set_num_threads(1)
    name = {"grid": "cpp", "inputs": None}.get(backend, backend)
    label = _label(backend)
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
                        out[f"{label} {key}"] = _run(method, name, pair, sizes, variant, seed)
    return out


def compute_in_subprocess(backend: str, capability: str | None = None) -> dict[str, str]:
    """:func:`compute` in a fresh process, under ``ATEN_CPU_CAPABILITY=capability`` if
    one is given (ATen reads it once, when torch is imported)."""
    env = dict(os.environ)
    # The checkout's package, not whichever one is installed: the script's own folder
    # (tests/) comes first on the child's sys.path, not the working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
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
    parser.add_argument("--backend", choices=(*BACKENDS, "inputs"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(compute(args.backend)))
        return
    record = {}
    for backend in BACKENDS:
        record.update(compute_in_subprocess(backend))
    # the torch backend once more, under ATen's default kernels: its lerp rounds twice there
    record.update(compute_in_subprocess("torch", capability="default"))
    labels = {key.split(" ", 1)[0] for key in record}
    if not {"torch", TORCH_UNFUSED} <= labels:
        sys.exit(
            f"recorded the torch backend only as {sorted(labels & {'torch', TORCH_UNFUSED})}: "
            "record on an x86 CPU with AVX2, where ATen's lerp is fused by default and "
            "unfused under ATEN_CPU_CAPABILITY=default, so that both are recorded"
        )
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(record)} fingerprints written to {RECORD}")


if __name__ == "__main__":
    main()
