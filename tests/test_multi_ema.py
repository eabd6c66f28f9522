"""The K-profile EMA (``ops.multi_ema_update_``) on every backend available here: bit for
bit K separate ``ema_update_`` calls on the same backend, and the reference's K EMAs within
the EMA's tolerance (bit for bit on the torch backends), for K = 1, 2, 3, 5, every dtype
pair, the odd sizes, flat tensors and lists, both non-finite policies with the skipped
counter, decays as numbers and as tensors (out-of-range ones included), over several steps.

Backends as in test_backends.py: "reference", "torch", "cpp", "grid" (the compiled CUDA
bodies on a simulated grid), "cuda" on a GPU, and "triton" when this file runs under
TRITON_INTERPRET=1, which is slow enough to be run by hand:
``TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest tests/test_multi_ema.py`` (the suite
checks the Triton K-profile kernels in triton_interpreter_cases.py).
"""

import contextlib
import os
import zlib
from dataclasses import dataclass

import pytest
import torch
from _backend_cases import _bits, _inject_nonfinite
from _extension_cases import require_backend
from _grid import simulated_grid

from belay_kernels import ops, reference
from belay_kernels.methods import DTYPE_PAIRS
from belay_kernels.testing import ODD_SIZES, assert_close, random_like_model, torch_threads

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
STEPS = 3 if IN_INTERPRETER else 5
NONFINITE_STEP = 1
LIST_SIZES = (1009, 0, 1, 3, 70_001, 31)
# decays on both sides of lerp's 0.5 switch, and 0 (a weight of 1: an exact copy)
DECAYS = (0.9, 0.3, 0.999, 0.05, 0.0, 0.7, 0.2, 0.5)
# An out-of-range tensor decay leaves its profile as it was and counts every element.
BAD_DECAYS = (float("nan"), 1.5, -0.25)

if IN_INTERPRETER:
    pytest.importorskip("triton")
    import _triton_interpreter

    _triton_interpreter.round_bf16_like_the_gpu()
    BACKENDS = {"triton": "cpu"}
else:
    BACKENDS = {"reference": "cpu", "torch": "cpu", "cpp": "cpu", "grid": "cpu"}
    if torch.cuda.is_available():
        BACKENDS["cuda"] = "cuda"
        BACKENDS["triton"] = "cuda"  # compiled for the GPU (bench/gpu_check.sh)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclass(frozen=True)
class Case:
    k: int
    pair: tuple  # (weights dtype, shadow dtype)
    sizes: tuple[int, ...]
    layout: str = "flat"
    policy: str = "skip"
    decays: str = "number"  # or "tensor", or "bad" (tensors, one of them out of range)

    @property
    def id(self) -> str:
        dtypes = "-".join(str(d).removeprefix("torch.") for d in self.pair)
        return f"K{self.k} {dtypes} {self.layout} {self.policy} {self.decays}"


def cases():
    for k in (1, 2, 3, 5):
        for pair in DTYPE_PAIRS:
            yield Case(k, pair, ODD_SIZES)
            yield Case(k, pair, LIST_SIZES, layout="list")
        yield Case(k, DTYPE_PAIRS[0], (1009,), policy="propagate")
        yield Case(k, DTYPE_PAIRS[4], (1, 3, 1009), layout="list", policy="propagate")
        for pair in (DTYPE_PAIRS[0], DTYPE_PAIRS[4]):
            yield Case(k, pair, (1009,), decays="tensor")
            yield Case(k, pair, (1, 3, 1009), layout="list", decays="tensor")
        yield Case(k, DTYPE_PAIRS[5], (70_001,), decays="bad")
        yield Case(k, DTYPE_PAIRS[0], (1, 3, 1009), layout="list", decays="bad")


def step_decays(case: Case, step: int) -> list:
    values = [DECAYS[(step + 3 * i) % len(DECAYS)] for i in range(case.k)]
    if case.decays == "number":
        return values
    if case.decays == "bad" and step == 2:
        values[step % case.k] = BAD_DECAYS[case.k % len(BAD_DECAYS)]
    dtype = torch.float64 if torch.float64 in case.pair else torch.float32
    return [torch.tensor(v, dtype=dtype) for v in values]


def _fresh(sizes, dtype, generator, device, nonfinite=False):
    out = []
    for n in sizes:
        t = random_like_model(n, dtype, generator=generator)
        if nonfinite:
            _inject_nonfinite(t, generator)
        out.append(t.to(device))
    return out


def _run(case: Case, backend: str, device: str, sizes) -> None:
    weights_dtype, shadow_dtype = case.pair
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case.id} {sizes}".encode()))
    weights = _fresh(sizes, weights_dtype, generator, device)
    fused = [_fresh(sizes, shadow_dtype, generator, device) for _ in range(case.k)]
    separate = [[t.clone() for t in profile] for profile in fused]
    spec = [[t.cpu().clone() for t in profile] for profile in fused]
    counters = {
        name: torch.zeros((), dtype=torch.int64, device=device) for name in ("fused", "separate")
    }
    skip = case.policy == "skip"
    as_arg = (lambda ts: ts[0]) if case.layout == "flat" else list
    for step in range(STEPS):
        for w, change in zip(
            weights,
            _fresh(sizes, weights_dtype, generator, device, nonfinite=step == NONFINITE_STEP),
        ):
            w.add_(change * 1e-2)
        decays = step_decays(case, step)
        ops.multi_ema_update_(
            [as_arg(p) for p in fused],
            as_arg(weights),
            decays=decays,
            nonfinite=case.policy,
            skipped=counters["fused"],
            backend=backend,
        )
        for profile, decay in zip(separate, decays):
            ops.ema_update_(
                as_arg(profile),
                as_arg(weights),
                decay=decay,
                nonfinite=case.policy,
                skipped=counters["separate"],
                backend=backend,
            )
        for profile, decay in zip(spec, decays):
            decay = decay.cpu() if isinstance(decay, torch.Tensor) else decay
            for s, w in zip(profile, weights):
                reference.ema_update_(s, w.cpu(), decay, skip, None)
        where = f"{case.id} {backend} sizes {list(sizes)} step {step}"
        for k in range(case.k):
            for i, (f, s, r) in enumerate(zip(fused[k], separate[k], spec[k])):
                message = f"{where}: profile {k} tensor {i}"
                assert torch.equal(_bits(f), _bits(s)), f"{message} differs from ema_update_"
                if backend in ("reference", "torch"):
                    assert torch.equal(_bits(f.cpu()), _bits(r)), f"{message} differs from the spec"
                else:
                    assert_close(f.cpu(), r, msg=message)
        assert int(counters["fused"]) == int(counters["separate"]), where
    if sum(sizes) and case.policy == "skip":
        assert int(counters["fused"]) > 0, f"{case.id}: the non-finite step was not counted"


CASES = list(cases())


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_profiles_are_separate_emas(backend, case):
    if backend in ("cpp", "grid", "cuda"):
        require_backend("cuda" if backend == "cuda" else "cpp")
    context = simulated_grid(3, 32) if backend == "grid" else contextlib.nullcontext()
    runs = [(n,) for n in case.sizes] if case.layout == "flat" else [case.sizes]
    with context:
        for sizes in runs:
            _run(case, "cpp" if backend == "grid" else backend, BACKENDS[backend], sizes)
