"""The registered ops themselves (torch.ops.belay_kernels.*): torch.library.opcheck for
every op, a torch.compile(fullgraph=True) training step, and clear refusals of bad input
when the ops are called directly, before any memory is written."""

import pytest
import torch
from _extension_cases import cpp_backend, one_cpu_thread, refuses  # noqa: F401 (fixtures)

from belay_kernels.testing import random_like_model

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")


def _ops():
    from belay_kernels.backend._library import ops

    return ops()


def _pair(n, weights_dtype=torch.float32, shadow_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        random_like_model(n, weights_dtype, generator=generator),
        random_like_model(n, shadow_dtype, generator=generator),
    )


def _samples():
    """(op name, args) covering each op, its number and tensor hyperparameters, and lists."""
    w, s = _pair(1009, torch.bfloat16, torch.float32)
    w2, s2 = _pair(31, torch.bfloat16, torch.float32, seed=1)
    counter = torch.zeros((), dtype=torch.int64)
    rate = torch.tensor([0.1], dtype=torch.float64)
    count = torch.tensor([2], dtype=torch.int64)
    yield "ema_update_", (s, w, 0.9, None, True, counter)
    yield "ema_update_", (s, w, 0.0, rate, False, None)
    yield "ema_update_foreach_", ([s, s2], [w, w2], 0.9, None, True, counter)
    yield "swa_update_", (s, w, 3, None, True, counter)
    yield "swa_update_", (s, w, 0, count, True, None)
    yield "swa_update_foreach_", ([s, s2], [w, w2], 1, None, False, None)
    yield "belay_step_", (w, s, 0.05, 0.6, None, None, True, counter)
    yield "belay_step_", (w, s, 0.0, 0.0, rate, rate, True, counter)
    yield "belay_step_foreach_", ([w, w2], [s, s2], 0.05, 0.6, None, None, True, None)
    yield "two_point_average_", (torch.empty_like(w), w, s)
    yield (
        "two_point_average_foreach_",
        ([torch.empty_like(w), torch.empty_like(w2)], [w, w2], [s, s2]),
    )
    yield "swap_", (w, s, False)
    yield "swap_foreach_", ([w, w2], [s, s2], True)


@pytest.mark.parametrize(
    "name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_opcheck(name, args):
    torch.library.opcheck(getattr(_ops(), name).default, args)


def _training_step(model, params, shadows, ema, x, y, counter, averaging):
    """Gradient (torch.func), an SGD step and the averaging ops, all in place."""

    def loss(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    grads = torch.func.grad(loss)(params)
    with torch.no_grad():
        for name, p in params.items():
            p.sub_(0.1 * grads[name])
        averaging(list(params.values()), shadows, ema, counter)


def _compiled_averaging(weights, shadows, ema, counter):
    ops = torch.ops.belay_kernels
    ops.ema_update_foreach_(ema, weights, 0.9, None, True, counter)
    for w, s in zip(weights, shadows):
        ops.belay_step_(w, s, 0.05, 0.6, None, None, True, counter)


def _eager_averaging(weights, shadows, ema, counter):
    for w, s, e in zip(weights, shadows, ema):
        e.lerp_(w, 0.1)
        before = w.clone()
        w.lerp_(s, 0.6)
        s.lerp_(before, 0.05)


def test_compiled_training_step_has_no_graph_break():
    """Gradient, optimizer update and the averaging ops in one fullgraph compile, checked
    against the same step written in eager torch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    state = {
        kind: (
            {k: v.detach().clone() for k, v in model.named_parameters()},
            [p.detach().clone() + 0.5 for p in model.parameters()],
            [p.detach().clone() - 0.5 for p in model.parameters()],
            torch.zeros((), dtype=torch.int64),
        )
        for kind in ("compiled", "eager")
    }
    compiled = torch.compile(_training_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        compiled(model, *state["compiled"][:3], x, y, state["compiled"][3], _compiled_averaging)
        _training_step(model, *state["eager"][:3], x, y, state["eager"][3], _eager_averaging)
    (params, shadows, ema, counter), (eager_params, eager_shadows, eager_ema, _) = (
        state["compiled"],
        state["eager"],
    )
    for got, want in zip(
        [*params.values(), *shadows, *ema], [*eager_params.values(), *eager_shadows, *eager_ema]
    ):
        torch.testing.assert_close(got, want)
    assert int(counter) == 0


# --- bad input on direct calls ---------------------------------------------------------


def test_refuses_unsupported_dtypes():
    ops = _ops()
    w, s = _pair(10, torch.float64, torch.float32)
    refuses(lambda: ops.ema_update_(s, w, 0.9, None, True, None), "no compiled kernel", s)
    ints = torch.arange(10)
    refuses(
        lambda: ops.ema_update_(ints, ints.clone(), 0.9, None, True, None),
        "no compiled kernel",
        ints,
    )
    w, s = _pair(10, torch.float16, torch.float32)
    refuses(lambda: ops.swap_(w, s, False), "no exact in-place swap", w, s)
    out = torch.zeros(10, dtype=torch.float32)  # not empty: NaN garbage never equals itself
    refuses(lambda: ops.two_point_average_(out, w, s), "out is Float", out)


def test_refuses_mismatched_sizes_and_layouts():
    ops = _ops()
    w, s = _pair(10)
    refuses(lambda: ops.ema_update_(s[:9], w, 0.9, None, True, None), "shadow has 9", s)
    wide = torch.randn(10, 2)
    refuses(lambda: ops.ema_update_(s, wide[:, 0], 0.9, None, True, None), "not contiguous", s)


def test_refuses_aliasing():
    ops = _ops()
    buffer = torch.randn(20)
    refuses(
        lambda: ops.belay_step_(buffer[:10], buffer[5:15], 0.1, 0.1, None, None, True, None),
        "share memory",
        buffer,
    )
    refuses(lambda: ops.swap_(buffer, buffer, False), "share memory", buffer)


def test_refuses_bad_scalars_and_counter():
    ops = _ops()
    w, s = _pair(10)
    refuses(lambda: ops.ema_update_(s, w, 1.5, None, True, None), r"decay must be in \[0, 1\]", s)
    refuses(lambda: ops.belay_step_(w, s, 0.1, -0.1, None, None, True, None), "beta", w, s)
    refuses(lambda: ops.swa_update_(s, w, -1, None, True, None), "count must be >= 0", s)
    refuses(lambda: ops.ema_update_(s, w, 0.0, torch.tensor([0.9]), True, None), "float64", s)
    refuses(lambda: ops.swa_update_(s, w, 0, torch.tensor([1.0]), True, None), "int64", s)
    bad_counter = torch.zeros(2, dtype=torch.int64)
    refuses(lambda: ops.ema_update_(s, w, 0.9, None, True, bad_counter), "skipped", s)
    refuses(
        lambda: ops.ema_update_(s, w, 0.9, None, True, torch.zeros((), dtype=torch.int32)),
        "skipped",
        s,
    )


def test_refuses_bad_lists():
    ops = _ops()
    w, s = _pair(10)
    w2, s2 = _pair(5, torch.bfloat16, torch.bfloat16)
    refuses(
        lambda: ops.ema_update_foreach_([s, s.clone()], [w], 0.9, None, True, None),
        "has 1 tensors",
        s,
    )
    refuses(
        lambda: ops.ema_update_foreach_([s, s2], [w, w2], 0.9, None, True, None),
        "one dtype per list",
        s,
        s2,
    )
    refuses(
        lambda: ops.ema_update_foreach_([s, s2], [w, w2[:4]], 0.9, None, True, None),
        r"weights\[1\] has 4 elements",
        s,
        s2,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refuses_mixed_devices():
    ops = _ops()
    w, s = _pair(10)
    refuses(lambda: ops.ema_update_(s.cuda(), w, 0.9, None, True, None), "move them", w)


def test_a_missing_build_is_reported_not_raised():
    from belay_kernels.backend import _library

    module, reason = _library._load("belay_kernels._no_such_build")
    assert module is None and "not importable" in reason


def test_package_works_without_the_build():
    """With the compiled module unimportable, the package imports, says why, and runs the
    ops on the torch reference."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['belay_kernels._C'] = None\n"
        "import torch, belay_kernels\n"
        "status = belay_kernels.backends()['cpp']\n"
        "assert status.startswith('unavailable') and 'not importable' in status, status\n"
        "s, w = torch.zeros(5), torch.ones(5)\n"
        "belay_kernels.ops.ema_update_(s, w, decay=0.5)\n"
        "assert torch.equal(s, torch.full((5,), 0.5))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
