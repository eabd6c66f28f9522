"""The Triton fused optimizer steps (belay_kernels.backend.triton.optimizers) against their
spec, reference.adam_average_ and reference.sgd_average_, run in Triton's interpreter on
CPU tensors: Adam/AdamW and SGD with their options, every average kind, GradScaler's
found_inf and grad_scale, non-finite gradients under both policies, and the refusals.

Not collected directly (no ``test_`` prefix): TRITON_INTERPRET=1 must be set before
Triton is imported, so tests/test_triton_interpreter.py runs this file in a subprocess.
To run it alone:

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest tests/triton_fused_cases.py

Tolerance: the kernels take each step in fp32 registers and round each tensor once on
store (rounding to the tensor's dtype the values that the reference reads back after
storing them), where the reference rounds after every torch op; and Triton's fma
contraction, and the interpreter's emulated fma (which rounds twice), round differently
from the CPU's ops. The results are therefore compared within the suite's tolerance of
two implementations of one formula (belay_kernels.testing.assert_close; the shadows at
their weights' tolerance, see _compare), step counts,
skipped counts and the non-finite pattern exactly; and bit for bit where nothing is
computed: found_inf writes nothing, "none" leaves the shadows alone, SWA's count 0 copies.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

import _triton_interpreter  # noqa: E402

from belay_kernels import BelayInputError, reference  # noqa: E402
from belay_kernels.backend import triton as triton_backend  # noqa: E402
from belay_kernels.testing import assert_close, tolerance  # noqa: E402

_triton_interpreter.round_bf16_like_the_gpu()

# NaN/inf inputs (the non-finite policy's test data) make numpy warn inside the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

STEPS = 3
# Odd sizes, an empty tensor, and 2053: a full fp32 block (2048 elements) and a tail.
SIZES = (1, 3, 0, 257, 2053)
FP32 = (torch.float32, torch.float32)
BF16_FP32 = (torch.bfloat16, torch.float32)
PAIRS = {"fp32": FP32, "bf16-fp32": BF16_FP32}

ADAM_OPTIONS = {
    "adamw": dict(weight_decay=0.1, decoupled=True),
    "adam-l2-maximize": dict(weight_decay=0.01, maximize=True),
    "adam-amsgrad": dict(amsgrad=True),
}
SGD_OPTIONS = {
    "momentum-dampening-decay": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "momentum-0": dict(),
    "maximize": dict(momentum=0.5, maximize=True),
}
# The average's scalars at each step (SWA's count follows the step: 0 copies).
AVERAGES = {
    "none": lambda step: [],
    "ema": lambda step: [0.9],
    "ema-k2": lambda step: [0.9, 0.3 + 0.1 * step],  # both sides of lerp's 0.5 switch
    "swa": lambda step: [float(step)],  # a whole float: average_scalars is a list of floats
    "belay": lambda step: [0.1, 0.6],
    "poster": lambda step: [0.3, 0.05],
}


def _kind(average: str) -> str:
    return average.split("-")[0]


def _profiles(average: str) -> int:
    return {"none": 0, "ema-k2": 2}.get(average, 1)


class Case:
    """One optimizer, its state and the shadows, for one backend module to step."""

    def __init__(self, optimizer, options, average, pair, seed=0, sizes=SIZES):
        weights_dtype, shadow_dtype = pair
        gen = torch.Generator().manual_seed(seed)
        self.optimizer, self.options, self.average = optimizer, options, average
        self.params = [torch.randn(n, generator=gen).to(weights_dtype) for n in sizes]
        self.shadows = [
            (p.float() + 0.1 * torch.randn(p.shape, generator=gen)).to(shadow_dtype)
            for _ in range(_profiles(average))
            for p in self.params
        ]
        zeros = [torch.zeros_like(p) for p in self.params]
        if optimizer == "adam":
            self.state = {
                "exp_avgs": zeros,
                "exp_avg_sqs": [torch.zeros_like(p) for p in self.params],
                "max_exp_avg_sqs": (
                    [torch.zeros_like(p) for p in self.params] if options.get("amsgrad") else []
                ),
                "state_steps": [torch.tensor(0.0) for _ in self.params],
            }
        else:
            buffers = [torch.empty_like(p) for p in self.params]
            self.state = {"momentum_buffers": buffers if options.get("momentum") else []}

    def clone(self):
        twin = object.__new__(Case)
        twin.optimizer, twin.options, twin.average = self.optimizer, self.options, self.average
        twin.params = [t.clone() for t in self.params]
        twin.shadows = [t.clone() for t in self.shadows]
        twin.state = {k: [t.clone() for t in v] for k, v in self.state.items()}
        return twin

    def tensors(self):
        return [*self.params, *self.shadows, *(t for v in self.state.values() for t in v)]

    def step(self, module, step, grads, grad_scale=None, found_inf=None, skip=True, skipped=None):
        o = self.options
        scalars = AVERAGES[self.average](step)
        if self.optimizer == "adam":
            module.adam_average_(
                self.params,
                grads,
                self.state["exp_avgs"],
                self.state["exp_avg_sqs"],
                self.state["max_exp_avg_sqs"],
                self.state["state_steps"],
                self.shadows,
                grad_scale,
                found_inf,
                0.01,
                0.9,
                0.999,
                1e-8,
                o.get("weight_decay", 0.0),
                o.get("decoupled", False),
                o.get("maximize", False),
                _kind(self.average),
                scalars,
                skip,
                skipped,
            )
        else:
            module.sgd_average_(
                self.params,
                grads,
                self.state["momentum_buffers"],
                self.shadows,
                grad_scale,
                found_inf,
                0.05,
                o.get("momentum", 0.0),
                o.get("dampening", 0.0),
                o.get("weight_decay", 0.0),
                o.get("nesterov", False),
                o.get("maximize", False),
                step == 0,
                _kind(self.average),
                scalars,
                skip,
                skipped,
            )


def _grads(case, step, nonfinite=False, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [(scale * torch.randn(p.shape, generator=gen)).to(p.dtype) for p in case.params]
    if getattr(case, "misaligned", False):
        grads[0] = _misaligned(grads[0])
    if nonfinite:
        for g in grads:
            if g.numel() >= 3:
                g[1], g[-1] = float("nan"), float("inf")
    return grads


def _compare(got: Case, want: Case, where: str) -> None:
    for i, (a, b) in enumerate(zip(got.params, want.params)):
        assert_close(a, b, f"{where}: params[{i}]")
    # A shadow is as close as the weights it averages: an fp32 shadow of bf16 weights that
    # differ by an ulp of bf16 (the step's roundings above) differs by that ulp times the
    # rate, so it is compared at the weights' tolerance.
    coarse = tolerance(got.params[0].dtype)
    for i, (a, b) in enumerate(zip(got.shadows, want.shadows)):
        torch.testing.assert_close(
            a.double(), b.double(), equal_nan=True, msg=f"{where}: shadows[{i}]", **coarse
        )
    for key, column in got.state.items():
        for i, (a, b) in enumerate(zip(column, want.state[key])):
            if key == "state_steps":
                assert torch.equal(a, b), f"{where}: {key}[{i}] {a} vs {b}"
            else:
                assert_close(a, b, f"{where}: {key}[{i}]")


def _run(case: Case, steps=STEPS, nonfinite_at=None, skip=True, grad_scale=None):
    """The Triton step and the reference side by side for ``steps`` steps."""
    want = case.clone()
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    for step in range(steps):
        scale = 1.0 if grad_scale is None else float(grad_scale)
        grads = _grads(case, step, nonfinite=step == nonfinite_at, scale=scale)
        ref_grads = [g.clone() for g in grads]
        # with a scale, GradScaler's found_inf too: zero, so the step runs
        found_inf = None if grad_scale is None else torch.zeros(())
        case.step(triton_backend, step, grads, grad_scale, found_inf, skip, counters[0])
        want.step(reference, step, ref_grads, grad_scale, found_inf, skip, counters[1])
        where = f"{case.optimizer} {case.options} {case.average} step {step}"
        _compare(case, want, where)
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            assert_close(a, b, f"{where}: grads[{i}]")
    assert int(counters[0]) == int(counters[1])
    return case, int(counters[0])


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("options", ADAM_OPTIONS.values(), ids=ADAM_OPTIONS.keys())
def test_adam_step_and_average_match_the_reference(options, average, pair):
    case, _ = _run(Case("adam", options, average, pair))
    assert all(int(s) == STEPS for s in case.state["state_steps"])


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("options", SGD_OPTIONS.values(), ids=SGD_OPTIONS.keys())
def test_sgd_step_and_average_match_the_reference(options, average, pair):
    _run(Case("sgd", options, average, pair))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fp64(optimizer):
    options = ADAM_OPTIONS["adam-amsgrad"] if optimizer == "adam" else SGD_OPTIONS["nesterov"]
    _run(Case(optimizer, options, "ema-k2", (torch.float64, torch.float64)))


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("average", ["ema-k2", "swa", "belay", "poster"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_nonfinite_gradients_under_both_policies(optimizer, average, skip):
    """A NaN and an inf in the gradients at step 1: the weights go non-finite in both
    implementations, and the shadows keep their values (skip) or take them (propagate);
    the counts of skipped elements agree exactly."""
    options = ADAM_OPTIONS["adamw"] if optimizer == "adam" else SGD_OPTIONS["nesterov"]
    case, skipped = _run(Case(optimizer, options, average, BF16_FP32), nonfinite_at=1, skip=skip)
    assert (skipped > 0) == skip
    bad_shadows = any(not s.isfinite().all() for s in case.shadows)
    # the poster's shadow follows the weights from before the step: a step behind
    assert bad_shadows == (not skip), case.shadows


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_grad_scale_unscales_the_gradients_in_place(optimizer):
    """1 / 3 is not a power of two: the factor is rounded as GradScaler rounds it."""
    options = ADAM_OPTIONS["adamw"] if optimizer == "adam" else SGD_OPTIONS["nesterov"]
    for pair in (FP32, BF16_FP32):
        _run(Case(optimizer, options, "ema-k2", pair), grad_scale=torch.tensor(3.0))


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("average", ["ema-k2", "belay", "poster"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_found_inf_writes_nothing(optimizer, average):
    options = ADAM_OPTIONS["adam-amsgrad"] if optimizer == "adam" else SGD_OPTIONS["nesterov"]
    case = Case(optimizer, options, average, BF16_FP32)
    case.step(triton_backend, 0, _grads(case, 0))  # a first step, so the state is not zero
    grads = _grads(case, 1, nonfinite=True)
    before = [t.clone() for t in case.tensors() + grads]
    skipped = torch.zeros((), dtype=torch.int64)
    case.step(triton_backend, 1, grads, torch.tensor(2.0**16), torch.tensor(1.0), True, skipped)
    for a, b in zip(case.tensors() + grads, before):
        assert torch.equal(_bits(a), _bits(b))
    assert int(skipped) == 0
    if optimizer == "adam":
        assert all(int(s) == 1 for s in case.state["state_steps"])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_none_leaves_the_shadows_alone(optimizer):
    """ "none" is a step on which the averager does not update: shadows it is handed stay
    bit for bit as they were."""
    case = Case(optimizer, {}, "ema", BF16_FP32)
    shadows = [s.clone() for s in case.shadows]
    case.average = "none"
    case.step(triton_backend, 0, _grads(case, 0))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(case.shadows, shadows))


@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_swa_count_zero_copies_the_new_weights(pair):
    case = Case("adam", ADAM_OPTIONS["adamw"], "swa", pair)
    case.step(triton_backend, 0, _grads(case, 0))
    for s, p in zip(case.shadows, case.params):
        assert torch.equal(s, p.to(s.dtype))


def _misaligned(t):
    """``t``'s values 4 bytes past a 16-byte boundary."""
    return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].copy_(t)


def test_a_tensor_split_into_pieces_reads_its_own_step_and_counts_it_once():
    """A tensor misaligned alike in every column runs as a scalar head and an aligned body,
    in two launches: both pieces read their tensor's step count, which goes up once."""
    from belay_kernels.backend.triton._launch import _aligned_pieces

    case = Case("adam", ADAM_OPTIONS["adamw"], "ema", FP32, sizes=(2053, 7))
    case.misaligned = True  # tensor 0 of every column, its gradient included (_grads)
    for column in (case.params, case.state["exp_avgs"], case.state["exp_avg_sqs"], case.shadows):
        column[0] = _misaligned(column[0])
    case.state["state_steps"][1].fill_(4.0)  # the tensors' counts differ
    row = [case.params[0], _grads(case, 0)[0], case.state["exp_avgs"][0], case.shadows[0]]
    assert _aligned_pieces(row) == ([(3, 2050)], [(0, 3)])
    case, _ = _run(case)
    assert [int(s) for s in case.state["state_steps"]] == [STEPS, STEPS + 4]


def _adam_args(case, gradients, **changes):
    args = dict(
        params=case.params,
        grads=gradients,
        exp_avgs=case.state["exp_avgs"],
        exp_avg_sqs=case.state["exp_avg_sqs"],
        max_exp_avg_sqs=[],
        state_steps=case.state["state_steps"],
        shadows=case.shadows,
        grad_scale=None,
        found_inf=None,
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=True,
        maximize=False,
        average="ema",
        average_scalars=[0.9],
    )
    args.update(changes)
    return args


REFUSED = {
    "short grads": (lambda c, g: dict(grads=g[:-1]), "grads must hold"),
    "shadow count": (lambda c, g: dict(average_scalars=[0.9, 0.8]), "2 shadow"),
    "nine profiles": (lambda c, g: dict(average_scalars=[0.9] * 9), "1 to 8 decays"),
    "decay above 1": (lambda c, g: dict(average_scalars=[1.5]), r"in \[0, 1\]"),
    "tensor decay": (lambda c, g: dict(average_scalars=[torch.tensor(0.9)]), "Python number"),
    "beta2 of 1": (lambda c, g: dict(beta2=1.0), r"beta2 must be in \[0.0, 1.0\)"),
    "unknown average": (lambda c, g: dict(average="polyak"), "average must be one of"),
    "swa scalars": (lambda c, g: dict(average="swa", average_scalars=[]), "takes 1 scalars"),
    "shape": (lambda c, g: dict(grads=[g[0], torch.zeros(4), *g[2:]]), "shape"),
    "dtype mix": (
        lambda c, g: dict(exp_avgs=[c.state["exp_avgs"][0].double(), *c.state["exp_avgs"][1:]]),
        "mixes dtypes",
    ),
    "strided": (
        lambda c, g: dict(grads=[torch.zeros(2 * g[0].numel())[::2], *g[1:]]),
        "not contiguous",
    ),
    "shared memory": (
        lambda c, g: dict(exp_avg_sqs=[c.state["exp_avgs"][0], *c.state["exp_avg_sqs"][1:]]),
        "share memory",
    ),
    "int step": (
        lambda c, g: dict(state_steps=[torch.tensor(0), *c.state["state_steps"][1:]]),
        "state_steps",
    ),
    "found_inf dtype": (lambda c, g: dict(found_inf=torch.tensor(0.0).double()), "found_inf"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_bad_arguments_are_refused_before_anything_is_written(name):
    changes, message = REFUSED[name]
    case = Case("adam", {}, "ema", FP32, sizes=(3, 5))
    grads = _grads(case, 0)
    before = [t.clone() for t in case.tensors() + grads]
    with pytest.raises(BelayInputError, match=message):
        triton_backend.adam_average_(**_adam_args(case, grads, **changes(case, grads)))
    assert all(torch.equal(a, b) for a, b in zip(case.tensors() + grads, before))


def test_sgd_refuses_buffers_that_do_not_match_the_momentum():
    case = Case("sgd", {}, "ema", FP32, sizes=(3, 5))
    params = [p.clone() for p in case.params]
    for momentum, buffers in ((0.9, []), (0.0, [torch.zeros(3), torch.zeros(5)])):
        with pytest.raises(BelayInputError, match="momentum_buffers"):
            triton_backend.sgd_average_(
                case.params, _grads(case, 0), buffers, case.shadows, None, None,
                0.1, momentum, 0.0, 0.0, False, False, True, "ema", [0.9],
            )  # fmt: skip
    with pytest.raises(BelayInputError, match="nesterov"):
        triton_backend.sgd_average_(
            case.params, _grads(case, 0), [], case.shadows, None, None,
            0.1, 0.0, 0.0, 0.0, True, False, True, "ema", [0.9],
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(case.params, params))


def test_supports_the_fused_ops_for_every_pair():
    from belay_kernels.methods import DTYPE_PAIRS

    for op in ("adam_average_", "sgd_average_"):
        assert hasattr(triton_backend, op)
        assert all(triton_backend.supports(op, pair) for pair in DTYPE_PAIRS)
    assert not triton_backend.supports("swap_", (torch.float16, torch.float32))
