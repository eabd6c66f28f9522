"""Bad input to the functional ops: a clear message, and no tensor changed."""

import pytest
import torch

from belay_kernels import BelayInputError, backends, ops


def fresh(n=17, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype)


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_untouched(tensors, before):
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


CASES = [
    (
        "shape",
        lambda s, w: ops.ema_update_(s, w[:-1], decay=0.9),
        r"weights has shape \(16,\) but shadow has shape \(17,\)",
    ),
    (
        "dtype",
        lambda s, w: ops.ema_update_(s, w.to(torch.int32), decay=0.9),
        "weights has dtype torch.int32",
    ),
    (
        "device",
        lambda s, w: ops.ema_update_(s, w.to("meta"), decay=0.9),
        "weights is on meta but shadow is on cpu",
    ),
    ("alias", lambda s, w: ops.ema_update_(s, s[:], decay=0.9), "shadow and weights share memory"),
    (
        "alias-belay",
        lambda s, w: ops.belay_step_(w, w, alpha=0.1, beta=0.1),
        "weights and shadow share memory",
    ),
    (
        "decay>1",
        lambda s, w: ops.ema_update_(s, w, decay=1.01),
        r"decay must be in \[0, 1\], got 1.01",
    ),
    (
        "decay-nan",
        lambda s, w: ops.ema_update_(s, w, decay=float("nan")),
        r"decay must be in \[0, 1\], got nan",
    ),
    ("decay-str", lambda s, w: ops.ema_update_(s, w, decay="0.9"), "decay must be a number"),
    (
        "alpha<0",
        lambda s, w: ops.belay_step_(w, s, alpha=-0.5, beta=0.1),
        r"alpha must be in \[0, 1\]",
    ),
    (
        "beta-nan",
        lambda s, w: ops.belay_step_(w, s, alpha=0.5, beta=float("nan")),
        r"beta must be in \[0, 1\]",
    ),
    ("count", lambda s, w: ops.swa_update_(s, w, count=-1), "count is how many models"),
    ("count-float", lambda s, w: ops.swa_update_(s, w, count=1.5), "count is how many models"),
    (
        "nonfinite",
        lambda s, w: ops.ema_update_(s, w, decay=0.9, nonfinite="drop"),
        "nonfinite must be one of",
    ),
    (
        "skipped",
        lambda s, w: ops.ema_update_(s, w, decay=0.9, skipped=torch.zeros(())),
        "skipped must be a one-element int64 tensor",
    ),
    (
        "backend",
        lambda s, w: ops.ema_update_(s, w, decay=0.9, backend="fortran"),
        "backend must be 'auto' or one of",
    ),
    (
        "list-length",
        lambda s, w: ops.ema_update_([s], [w, w.clone()], decay=0.9),
        r"the tensor lists differ in length \(shadow: 1, weights: 2\)",
    ),
    (
        "list-mixed",
        lambda s, w: ops.ema_update_([s], w, decay=0.9),
        "weights must be a tensor or a list of tensors",
    ),
    (
        "list-item",
        lambda s, w: ops.ema_update_([s, s.clone()], [w, w[:3]], decay=0.9),
        r"weights\[1\] has shape",
    ),
    (
        "two-point-out",
        lambda s, w: ops.two_point_average(w, s, out=w),
        "out and weights share memory",
    ),
    (
        "swap-pair",
        lambda s, w: ops.swap_(w.to(torch.float16), s),
        "no exact in-place swap for torch.float16 weights with a torch.float32 shadow",
    ),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_and_touches_nothing(call, message):
    shadow, weights = fresh(seed=1), fresh(seed=2)
    before = snapshot(shadow, weights)
    with pytest.raises(BelayInputError, match=message):
        call(shadow, weights)
    assert_untouched((shadow, weights), before)


def test_a_bad_row_late_in_a_list_leaves_the_earlier_rows_untouched():
    shadows = [fresh(seed=i) for i in range(3)]
    weights = [fresh(seed=10 + i) for i in range(2)] + [fresh(dtype=torch.float64).to(torch.int64)]
    before = snapshot(*shadows)
    with pytest.raises(BelayInputError, match=r"weights\[2\] has dtype torch.int64"):
        ops.ema_update_(shadows, weights, decay=0.5)
    assert_untouched(shadows, before)


def test_an_unavailable_backend_says_why():
    status = backends()
    assert status["torch"].startswith("available")
    missing = [name for name, text in status.items() if text.startswith("unavailable")]
    for name in missing:
        with pytest.raises(BelayInputError, match=f"backend '{name}' is unavailable: "):
            ops.ema_update_(fresh(), fresh(seed=3), decay=0.9, backend=name)


def test_importing_a_backend_leaves_the_status_function_in_place():
    """The backends live in the package belay_kernels.backend; importing one binds that
    package on belay_kernels, next to (not over) the status function backends()."""
    import subprocess
    import sys

    code = (
        "import importlib, belay_kernels as bk\n"
        "before = bk.backends\n"
        "module = importlib.import_module('belay_kernels.backend.torch')\n"
        "from belay_kernels._backends import backends as status\n"
        "assert bk.backends is before is status and bk.backend.torch is module\n"
        "assert bk.backends()['torch'].startswith('available')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_list_path_runs_each_row():
    shadows = [fresh(5, seed=i) for i in range(3)]
    weights = [fresh(5, seed=10 + i) for i in range(3)]
    expected = [torch.lerp(s, w, 0.25) for s, w in zip(shadows, weights)]
    ops.ema_update_(shadows, weights, decay=0.75, backend="torch")
    for got, want in zip(shadows, expected):
        assert torch.equal(got, want)
