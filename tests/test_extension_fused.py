"""The compiled fused optimizer step and average (adam_average_, sgd_average_) against the
reference (``reference.adam_average_``, ``sgd_average_``): on the CPU loops and on the CUDA
bodies over a simulated grid, every dtype pair, odd sizes, several steps, Adam/AdamW
(weight decay, maximize, AMSGrad) and SGD (momentum, dampening, Nesterov, first step),
every average, both non-finite policies with NaN and inf in the gradients, GradScaler's
unscaling and found_inf, one and two threads, and refused calls that change nothing.

Bit for bit where the reference rounds as the kernels do (``_fused_exactness`` says
where, and why not elsewhere); else every tensor must agree within BOUND (relative and
absolute, in units of the dtype's epsilon: an ulp's difference grown over STEPS steps
through the optimizer's state), NaN positions and skipped counts exactly."""

import pytest
import torch
from _backend_cases import _inject_nonfinite
from _extension_cases import (  # noqa: F401 (cpp_backend, one_cpu_thread: fixtures)
    cpp_backend,
    one_cpu_thread,
    refuses,
)
from _fused_exactness import REFERENCE_FUSED, compiled_is_exact
from _grid import simulated_grid

from belay_kernels import reference
from belay_kernels.testing import DTYPE_PAIRS, random_like_model, torch_threads

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

STEPS = 4
NONFINITE_STEP = 2
SIZES = (0, 1, 3, 31, 1009)
LARGE = 100_003
# Within BOUND[dtype] * eps(dtype), relative and absolute, where not bit for bit.
BOUND = 16

ADAM_OPTIONS = {
    "adam": {"weight_decay": 0.0, "decoupled": False, "maximize": False, "amsgrad": False},
    "adam-wd-max": {"weight_decay": 0.01, "decoupled": False, "maximize": True, "amsgrad": False},
    "adamw": {"weight_decay": 0.1, "decoupled": True, "maximize": False, "amsgrad": False},
    "adamw-amsgrad": {"weight_decay": 0.1, "decoupled": True, "maximize": False, "amsgrad": True},
}
SGD_OPTIONS = {
    "sgd": {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "sgd-wd-max": {
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.01,
        "nesterov": False,
        "maximize": True,
    },
    "momentum": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01, "nesterov": False},
    "nesterov": {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": True},
}
AVERAGES = ("none", "ema", "swa", "belay", "poster")


def _scalars(average, step):
    return {
        "none": [],
        "ema": [0.9, 0.75],
        "swa": [step],
        "belay": [0.1, 0.05],
        "poster": [0.2, 0.1],
    }[average]


def _profiles(average):
    return {"none": 0, "ema": 2}.get(average, 1)


def pair_id(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def _backend():
    from belay_kernels.backend import cpp

    return cpp


def _exact(optimizer, dtype, options) -> bool:
    coupled = optimizer == "adam" and options["weight_decay"] != 0 and not options["decoupled"]
    return compiled_is_exact(optimizer, dtype, coupled)


class State:
    """One side's tensors: the parameters and their optimizer state, the shadows."""

    def __init__(self, optimizer, pair, sizes, average, amsgrad, momentum, seed, offset=0):
        param_dtype, shadow_dtype = pair
        g = torch.Generator().manual_seed(seed)

        def placed(t):
            storage = torch.empty(t.numel() + offset, dtype=t.dtype)
            return storage[offset:].copy_(t)

        self.params = [placed(random_like_model(n, param_dtype, generator=g)) for n in sizes]
        zeros = [placed(torch.zeros(n, dtype=param_dtype)) for n in sizes]
        self.shadows = [
            placed(random_like_model(n, shadow_dtype, generator=g))
            for _ in range(_profiles(average))
            for n in sizes
        ]
        if optimizer == "adam":
            self.exp_avgs = zeros
            self.exp_avg_sqs = [z.clone() for z in zeros]
            self.max_exp_avg_sqs = [z.clone() for z in zeros] if amsgrad else []
            self.state_steps = [torch.zeros((), dtype=torch.float32) for _ in sizes]
        else:
            self.momentum_buffers = zeros if momentum else []
        self.skipped = torch.zeros((), dtype=torch.int64)

    def clone(self):
        other = object.__new__(State)
        for name, value in vars(self).items():
            setattr(
                other,
                name,
                [t.clone() for t in value] if isinstance(value, list) else value.clone(),
            )
        return other

    def tensors(self):
        return {
            name: value
            for name, value in vars(self).items()
            if isinstance(value, list) or name == "skipped"
        }


def _grads(pair, sizes, step, seed, nonfinite, offset=0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for n in sizes:
        t = random_like_model(n, pair[0], generator=g)
        if nonfinite:
            _inject_nonfinite(t, g)
        storage = torch.empty(n + offset, dtype=pair[0])
        grads.append(storage[offset:].copy_(t))
    return grads


def _call(module, optimizer, state, grads, options, average, step, skip, scaler=(None, None)):
    scalars = _scalars(average, step)
    grad_scale, found_inf = scaler
    if optimizer == "adam":
        module.adam_average_(
            state.params,
            grads,
            state.exp_avgs,
            state.exp_avg_sqs,
            state.max_exp_avg_sqs,
            state.state_steps,
            state.shadows,
            grad_scale,
            found_inf,
            0.01,
            0.9,
            0.999,
            1e-8,
            options["weight_decay"],
            options["decoupled"],
            options["maximize"],
            average,
            scalars,
            skip,
            state.skipped,
        )
    else:
        module.sgd_average_(
            state.params,
            grads,
            state.momentum_buffers,
            state.shadows,
            grad_scale,
            found_inf,
            0.01,
            options["momentum"],
            options["dampening"],
            options["weight_decay"],
            options["nesterov"],
            options.get("maximize", False),
            step == 0,
            average,
            scalars,
            skip,
            state.skipped,
        )


def _same_bits(got, want, message):
    assert got.dtype == want.dtype and got.shape == want.shape, message
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{message}: NaN positions differ"
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    differ = (got.view(bits) != want.view(bits)) & ~nan
    assert not differ.any(), f"{message}: {int(differ.sum())} of {got.numel()} elements differ"


def _close(got, want, message, dtype):
    """Within BOUND epsilons of ``dtype``, the parameters' (an fp32 shadow of bf16 weights
    inherits the weights' differences)."""
    assert got.dtype == want.dtype and got.shape == want.shape, message
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{message}: NaN positions differ"
    tolerance = BOUND * max(torch.finfo(got.dtype).eps, torch.finfo(dtype).eps)
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tolerance, atol=tolerance, equal_nan=True, msg=message
    )


def _compare(got: State, want: State, exact: bool, label: str):
    for name, value in want.tensors().items():
        mine = got.tensors()[name]
        if name == "skipped":
            assert int(mine) == int(value), f"{label}: skipped {int(mine)} != {int(value)}"
            continue
        for i, (a, b) in enumerate(zip(mine, value)):
            if exact:
                _same_bits(a, b, f"{label}: {name}[{i}]")
            else:
                _close(a, b, f"{label}: {name}[{i}]", want.params[0].dtype)


def run_both(
    optimizer,
    pair,
    options,
    average,
    *,
    sizes=SIZES,
    skip=True,
    seed=0,
    offset=0,
    steps=STEPS,
    scaler=None,
    module=None,
):
    """``steps`` steps through the compiled op and the reference; returns (compiled,
    reference) states."""
    amsgrad = options.get("amsgrad", False)
    momentum = options.get("momentum", 0.0) != 0
    ours = State(optimizer, pair, sizes, average, amsgrad, momentum, seed, offset)
    theirs = ours.clone()
    module = module or _backend()
    for step in range(steps):
        grads = _grads(pair, sizes, step, seed, step == NONFINITE_STEP, offset)
        scaled = scaler(step) if scaler else (None, None)
        their_scaler = tuple(t.clone() if t is not None else None for t in scaled)
        their_grads = [g.clone() for g in grads]
        _call(module, optimizer, ours, grads, options, average, step, skip, scaled)
        _call(reference, optimizer, theirs, their_grads, options, average, step, skip, their_scaler)
        # the last step's gradients, unscaled in place, are compared too
        ours.grads, theirs.grads = grads, their_grads
    return ours, theirs


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("options", list(ADAM_OPTIONS), ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_adam_matches_reference(pair, options, average):
    ours, theirs = run_both("adam", pair, ADAM_OPTIONS[options], average)
    _compare(ours, theirs, _exact("adam", pair[0], ADAM_OPTIONS[options]), options)


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("options", list(SGD_OPTIONS), ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_sgd_matches_reference(pair, options, average):
    ours, theirs = run_both("sgd", pair, SGD_OPTIONS[options], average)
    _compare(ours, theirs, _exact("sgd", pair[0], SGD_OPTIONS[options]), options)


@pytest.mark.parametrize("average", AVERAGES[1:])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[4]], ids=pair_id)
def test_nonfinite_propagates_without_skip(pair, optimizer, average):
    options = ADAM_OPTIONS["adamw"] if optimizer == "adam" else SGD_OPTIONS["momentum"]
    ours, theirs = run_both(optimizer, pair, options, average, skip=False, seed=3)
    assert int(ours.skipped) == 0
    _compare(ours, theirs, _exact(optimizer, pair[0], options), f"{optimizer} propagate")


@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[3]], ids=pair_id)
def test_grad_scaler(pair, optimizer, found):
    """Gradients unscaled in place by float32(1 / scale); a nonzero found_inf on a step
    writes nothing (the reference's steps do not advance either)."""
    options = ADAM_OPTIONS["adam-wd-max"] if optimizer == "adam" else SGD_OPTIONS["nesterov"]

    def scaler(step):
        inf = found if step == 1 else 0.0
        return torch.tensor(2.0 ** (step + 9) * 3), torch.tensor(inf)

    ours, theirs = run_both(optimizer, pair, options, "ema", scaler=scaler, seed=5)
    _compare(ours, theirs, _exact(optimizer, pair[0], options), f"{optimizer} scaler")
    if optimizer == "adam":
        assert [float(s) for s in ours.state_steps] == [STEPS - found] * len(SIZES)


def test_found_inf_writes_nothing():
    pair = DTYPE_PAIRS[4]
    state = State("adam", pair, SIZES, "poster", True, False, seed=7)
    before = state.clone()
    grads = _grads(pair, SIZES, 0, 7, False)
    grads_before = [g.clone() for g in grads]
    scaler = (torch.tensor(1024.0), torch.tensor(1.0))
    _call(
        _backend(), "adam", state, grads, ADAM_OPTIONS["adamw-amsgrad"], "poster", 0, True, scaler
    )
    _compare(state, before, True, "found_inf")
    for g, b in zip(grads, grads_before):
        _same_bits(g, b, "found_inf: grads")


@pytest.mark.parametrize(
    "optimizer,options,average,pair",
    [
        ("adam", "adamw-amsgrad", "ema", DTYPE_PAIRS[0]),
        ("adam", "adam-wd-max", "poster", DTYPE_PAIRS[4]),
        ("sgd", "momentum", "belay", DTYPE_PAIRS[5]),
        ("sgd", "nesterov", "swa", DTYPE_PAIRS[1]),
    ],
    ids=lambda v: v if isinstance(v, str) else pair_id(v),
)
def test_large_unaligned_and_threads(optimizer, options, average, pair):
    """A tensor of LARGE elements (several threads' chunks) that starts off a 16-byte
    boundary: the reference's results, and one and two threads give the same bits."""
    table = ADAM_OPTIONS if optimizer == "adam" else SGD_OPTIONS
    sizes = (LARGE, 5)
    with torch_threads(2):
        two, theirs = run_both(
            optimizer, pair, table[options], average, sizes=sizes, offset=1, steps=3, seed=11
        )
    one, _ = run_both(
        optimizer, pair, table[options], average, sizes=sizes, offset=1, steps=3, seed=11
    )
    _compare(two, one, True, "two threads against one")
    _compare(one, theirs, _exact(optimizer, pair[0], table[options]), "large")


@pytest.mark.parametrize(
    "optimizer,options,average,pair",
    [
        ("adam", "adamw-amsgrad", "ema", DTYPE_PAIRS[0]),
        ("adam", "adam-wd-max", "poster", DTYPE_PAIRS[4]),
        ("adam", "adam", "belay", DTYPE_PAIRS[2]),
        ("sgd", "momentum", "belay", DTYPE_PAIRS[5]),
        ("sgd", "nesterov", "swa", DTYPE_PAIRS[1]),
        ("sgd", "sgd", "none", DTYPE_PAIRS[3]),
    ],
    ids=lambda v: v if isinstance(v, str) else pair_id(v),
)
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_bodies_on_a_simulated_grid(optimizer, options, average, pair, offset):
    """The CUDA kernels' bodies (grid_body.h: head, 128-bit vectors, tail; tensor lists in
    chunks) give the CPU loops' bits, GradScaler's tensors read by the kernel."""
    table = ADAM_OPTIONS if optimizer == "adam" else SGD_OPTIONS

    def scaler(step):
        return torch.tensor(1024.0), torch.tensor(0.0)

    sizes = (3, 1009, 131, 0, 64)
    cpu, _ = run_both(
        optimizer, pair, table[options], average, sizes=sizes, offset=offset, scaler=scaler, seed=13
    )
    with simulated_grid(blocks=3, threads=8, chunk=64):
        grid, _ = run_both(
            optimizer,
            pair,
            table[options],
            average,
            sizes=sizes,
            offset=offset,
            scaler=scaler,
            seed=13,
        )
    _compare(grid, cpu, True, "simulated grid")


def test_k_profiles_up_to_the_maximum():
    from belay_kernels.backend._compiled import max_profiles

    k = max_profiles()
    decays = [0.5 + 0.05 * p for p in range(k)]
    pair = DTYPE_PAIRS[0]
    ours = State("sgd", pair, SIZES, "ema", False, True, seed=17)
    ours.shadows = [s for _ in range(k // 2) for s in ours.shadows]
    ours.shadows = [s.clone() for s in ours.shadows]
    theirs = ours.clone()
    grads = _grads(pair, SIZES, 0, 17, True)
    for module, state in ((_backend(), ours), (reference, theirs)):
        module.sgd_average_(
            state.params,
            [g.clone() for g in grads],
            state.momentum_buffers,
            state.shadows,
            None,
            None,
            0.01,
            0.9,
            0.0,
            0.0,
            False,
            False,
            True,
            "ema",
            decays,
            True,
            state.skipped,
        )
    _compare(ours, theirs, REFERENCE_FUSED, "K = max")


def test_supports():
    from belay_kernels.backend import _compiled

    for op in ("adam_average_", "sgd_average_"):
        for pair in DTYPE_PAIRS:
            assert _compiled.supports(op, pair)
        assert not _compiled.supports(op, (torch.float32, torch.bfloat16))
        assert not _compiled.supports(op, (torch.float64, torch.float32))
    # the table's ops answer as before
    assert _compiled.supports("ema_update_", (torch.float32, torch.bfloat16))


def _adam_call(state, default_grads, **changes):
    arguments = dict(
        params=state.params,
        grads=default_grads,
        exp_avgs=state.exp_avgs,
        exp_avg_sqs=state.exp_avg_sqs,
        max_exp_avg_sqs=state.max_exp_avg_sqs,
        state_steps=state.state_steps,
        shadows=state.shadows,
        grad_scale=None,
        found_inf=None,
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
        maximize=False,
        average="ema",
        average_scalars=[0.9, 0.75],
        skip_nonfinite=True,
        skipped=state.skipped,
    )
    arguments.update(changes)
    return lambda: torch.ops.belay_kernels.adam_average_(*arguments.values())


def _adam_refusals(state, grads):
    p, g = state.params, grads
    other_dtype = [t.double() for t in state.exp_avgs]
    strided = [torch.zeros(2 * t.numel(), dtype=t.dtype)[::2] for t in state.exp_avgs]
    return {
        "grads has 4 tensors": dict(grads=g[:-1]),
        "exp_avgs are Double": dict(exp_avgs=other_dtype),
        "not contiguous": dict(exp_avgs=strided),
        "unknown average 'emma'": dict(average="emma"),
        "takes 1 to 8 decays": dict(average_scalars=[0.5] * 9),
        "in \\[0, 1\\]": dict(average_scalars=[0.9, 1.5]),
        "needs 5 shadows": dict(average="swa", average_scalars=[3]),
        "takes \\[alpha, beta\\]": dict(average="belay", average_scalars=[0.1]),
        "takes no average_scalars": dict(average="none"),
        "state_steps has 4": dict(state_steps=state.state_steps[:-1]),
        "state_steps\\[0\\] must be": dict(
            state_steps=[torch.zeros((), dtype=torch.float64)] + state.state_steps[1:]
        ),
        "found_inf must be": dict(found_inf=torch.zeros(2)),
        "grad_scale must be": dict(grad_scale=torch.ones((), dtype=torch.float64)),
        "share memory": dict(grads=[p[0], *g[1:]]),
        "betas must be": dict(beta1=1.0),
        "no compiled kernel": dict(shadows=[s.double() for s in state.shadows]),
        "skipped must be": dict(skipped=torch.zeros((), dtype=torch.int32)),
    }


def test_refused_calls_change_nothing():
    pair = DTYPE_PAIRS[4]
    sizes = (3, 31, 0, 1009, 1)
    state = State("adam", pair, sizes, "ema", False, False, seed=19)
    grads = _grads(pair, sizes, 0, 19, False)
    for match, changes in _adam_refusals(state, grads).items():
        watched = [*state.params, *grads, *state.exp_avgs, *state.shadows, *state.state_steps]
        refuses(_adam_call(state, grads, **changes), match, *watched, state.skipped)


def test_sgd_refusals_change_nothing():
    pair = DTYPE_PAIRS[0]
    state = State("sgd", pair, SIZES, "belay", False, True, seed=23)
    grads = _grads(pair, SIZES, 0, 23, False)
    watched = [*state.params, *grads, *state.momentum_buffers, *state.shadows]

    def call(**changes):
        arguments = dict(
            params=state.params,
            grads=grads,
            momentum_buffers=state.momentum_buffers,
            shadows=state.shadows,
            grad_scale=None,
            found_inf=None,
            lr=0.01,
            momentum=0.9,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            first_step=False,
            average="belay",
            average_scalars=[0.1, 0.05],
            skip_nonfinite=True,
            skipped=state.skipped,
        )
        arguments.update(changes)
        return lambda: torch.ops.belay_kernels.sgd_average_(*arguments.values())

    refuses(call(momentum=0.0), "momentum_buffers has 5 tensors", *watched)
    refuses(call(momentum_buffers=[]), "momentum_buffers has 0 tensors", *watched)
    refuses(call(average="poster", average_scalars=[0.1, -0.5]), "in \\[0, 1\\]", *watched)
    refuses(call(shadows=state.shadows[:-1]), "needs 5 shadows", *watched)
    refuses(
        call(params=[p.double() for p in state.params]),
        "grads are Float but params are Double",
        *watched,
    )
