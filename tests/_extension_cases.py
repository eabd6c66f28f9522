"""Shared by the extension tests: run one method for many steps through a backend and
through the reference on identical fresh random data, and compare everything."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from _backend_cases import _inject_nonfinite

from belay_kernels import backends, ops
from belay_kernels.testing import (
    assert_close,
    random_like_model,
    tolerance,
    torch_threads,
)

STEPS = 6
NONFINITE_STEP = 2  # the step at which some incoming weights are NaN / +inf / -inf
# Rates on both sides of 0.5, so both branches of the two-sided lerp run.
EMA_DECAYS = (0.9, 0.3)
BELAY_RATES = ({"alpha": 0.05, "beta": 0.6}, {"alpha": 0.7, "beta": 0.2})


@pytest.fixture(scope="module", autouse=False)
def one_cpu_thread():
    """Run a test module on one intra-op thread. On this shared 2-core machine, OpenMP's
    spinning threads made every op ~40x slower under load (torch's own ops included);
    test_extension_cpu.py checks the parallel split separately."""
    with torch_threads(1):
        yield


def refuses(call, match, *untouched):
    """A direct call of a compiled op raises (TORCH_CHECK_VALUE) and writes nothing."""
    before = [t.clone() for t in untouched]
    with pytest.raises(ValueError, match=match):
        call()
    for t, b in zip(untouched, before):
        assert torch.equal(t, b), "a refused call wrote memory"


def require_backend(name: str) -> None:
    """Skip when the compiled backend is absent, unless CI demands it
    (BELAY_KERNELS_REQUIRE_EXTENSION=1 turns the skip into a failure)."""
    status = backends()[name]
    if status.startswith("available"):
        return
    if os.environ.get("BELAY_KERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"backend {name!r} is required here but {status}")
    pytest.skip(f"backend {name!r} {status}")


@pytest.fixture(scope="module")
def cpp_backend():
    require_backend("cpp")


def pair_id(pair) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in pair)


class Trajectory:
    """Weights and shadows (lists of tensors of the given sizes) and the step's inputs,
    regenerated identically for each backend from one seed."""

    def __init__(self, pair, sizes, seed, *, nonfinite, offsets=(0, 0), device="cpu"):
        self.device = torch.device(device)
        self.weights_dtype, self.shadow_dtype = pair
        self.sizes, self.seed, self.nonfinite = sizes, seed, nonfinite
        # Elements to skip at the start of the storage of (weights, shadow): a nonzero
        # offset gives a contiguous tensor whose start is not 16-byte aligned.
        self.offsets = {"weights": offsets[0], "shadow": offsets[1]}

    def tensors(self, role, generator):
        dtype = self.weights_dtype if role == "weights" else self.shadow_dtype
        skip = self.offsets[role]
        return [
            random_like_model(n + skip, dtype, generator=generator).to(self.device)[skip:]
            for n in self.sizes
        ]

    def placed_like(self, role, tensors):
        """Copies of ``tensors`` that start where the role's tensors start (same offset)."""
        skip = self.offsets[role]
        copies = []
        for t in tensors:
            storage = torch.empty(t.numel() + skip, dtype=t.dtype, device=t.device)
            copies.append(storage[skip:].copy_(t))
        return copies

    def incoming(self, step, generator):
        """The step's new weights (for EMA and SWA) or the optimizer's change (BELAY)."""
        fresh = self.tensors("weights", generator)
        if self.nonfinite and step == NONFINITE_STEP:
            for t in fresh:
                _inject_nonfinite(t, generator)
        return fresh


def _arg(tensors):
    """A single tensor when the trajectory has one, else the list (the foreach path)."""
    return tensors[0] if len(tensors) == 1 else tensors


def run_method(method, backend, trajectory, *, policy="skip", hyper=None):
    """Returns every tensor the method wrote, and the skipped counter."""
    generator = torch.Generator().manual_seed(trajectory.seed)
    skipped = torch.zeros((), dtype=torch.int64, device=trajectory.device)
    shadow = trajectory.tensors("shadow", generator)
    weights = trajectory.tensors("weights", generator)
    outs = []
    for step in range(STEPS):
        incoming = trajectory.incoming(step, generator)
        if method == "ema":
            ops.ema_update_(_arg(shadow), _arg(incoming), decay=hyper, nonfinite=policy,
                            skipped=skipped, backend=backend)
        elif method == "swa":
            ops.swa_update_(_arg(shadow), _arg(incoming), count=step, nonfinite=policy,
                            skipped=skipped, backend=backend)
        elif method == "belay":
            for w, change in zip(weights, incoming):
                w.add_(change * 1e-2)  # the optimizer's step (non-finite where injected)
            ops.belay_step_(_arg(weights), _arg(shadow), **hyper, nonfinite=policy,
                            skipped=skipped, backend=backend)
        elif method == "two_point":
            snapshot = trajectory.placed_like("shadow", shadow)
            out = trajectory.placed_like("weights", incoming)
            ops.two_point_average(_arg(incoming), _arg(snapshot), out=_arg(out), backend=backend)
            outs += out
        else:
            raise ValueError(method)
    return shadow + weights + outs, skipped


def compare_with_reference(method, backend, trajectory, *, policy="skip", hyper=None):
    got, got_skipped = run_method(method, backend, trajectory, policy=policy, hyper=hyper)
    want, want_skipped = run_method(method, "torch", trajectory, policy=policy, hyper=hyper)
    coarsest = max(trajectory.weights_dtype, trajectory.shadow_dtype,
                   key=lambda d: tolerance(d)["rtol"])
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype
        message = f"{method} {backend} tensor {i} of size {g.numel()}"
        if method == "belay" and g.dtype != coarsest:
            # BELAY feeds the weights back into the shadow: an fp32 shadow next to bf16
            # weights inherits one bf16 rounding difference of the weights per step.
            torch.testing.assert_close(g.double(), w.double(), equal_nan=True,
                                       msg=lambda m: f"{message}\n{m}", **tolerance(coarsest))
        else:
            assert_close(g, w, msg=message)
    assert int(got_skipped) == int(want_skipped)
    return int(got_skipped)


def check_swap(backend, pair, sizes, seed, device="cpu"):
    """Forward and inverse swap equal the reference bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    weights = [random_like_model(n, pair[0], generator=generator).to(device) for n in sizes]
    shadow = [random_like_model(n, pair[1], generator=generator).to(device) for n in sizes]
    originals = [t.clone() for t in weights + shadow]
    ref_w, ref_s = [t.clone() for t in weights], [t.clone() for t in shadow]
    for inverse in (False, True):
        ops.swap_(_arg(weights), _arg(shadow), inverse=inverse, backend=backend)
        ops.swap_(_arg(ref_w), _arg(ref_s), inverse=inverse, backend="torch")
        for g, w in zip(weights + shadow, ref_w + ref_s):
            assert torch.equal(_bits(g), _bits(w)), f"swap inverse={inverse} differs"
    for g, o in zip(weights + shadow, originals):
        assert torch.equal(_bits(g), _bits(o)), "swap then inverse did not restore the bits"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@contextlib.contextmanager
def simulated_grid(blocks, threads, chunk=64):
    """Backend "cpp" runs the compiled CUDA bodies on a simulated grid of ``blocks`` blocks
    of ``threads`` threads inside the block (the harness's one door to the simulation)."""
    from belay_kernels.extension._entry_points import simulated_grid as grid

    with grid(blocks, threads, chunk):
        yield
