"""A step runs what the averager planned when it was built: a few Python calls, the same
number for 10 tensors as for 100, no host sync, and still every refusal before a write."""

import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import belay_kernels as bk
from belay_kernels import bound
from belay_kernels._backends import backends

HAVE_CPP = backends()["cpp"].startswith("available")


def linear_stack(n: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(n)])


def averagers(model: nn.Module, tmp_path, **options) -> list:
    return [
        bk.EMA(model, decay=0.9, **options),
        bk.SWA(model, **options),
        bk.Belay(model, alpha=0.1, beta=0.1, **options),
        bk.TwoPoint(model, gap=1, **options),
        bk.PowerEMA(model, sigma_rel=0.1, **options),
        bk.PostHocEMA(model, snapshot_every=10**9, snapshot_dir=tmp_path / "snapshots", **options),
    ]


def python_calls(fn) -> tuple[int, list]:
    """The Python calls ``fn()`` makes, and for each call of torch's op wrapper the frames
    between ``Averager.step`` and it (both included)."""
    calls, depths = [], []

    def profile(frame, event, arg):
        if event != "call":
            return
        calls.append(frame.f_code.co_name)
        if (
            frame.f_code.co_filename.endswith("torch/_ops.py")
            and frame.f_code.co_name == "__call__"
        ):
            depth, f = 1, frame.f_back
            while f is not None and not (
                f.f_code.co_name == "step" and f.f_code.co_filename.endswith("averagers.py")
            ):
                depth, f = depth + 1, f.f_back
            depths.append(depth + 1)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(calls), depths  # the call of fn itself included


@pytest.mark.skipif(not HAVE_CPP, reason="the compiled kernels are not built")
def test_a_flat_step_is_a_few_calls_from_step_to_the_kernel(tmp_path):
    ema = bk.EMA(linear_stack(3), decay=0.9, backend="cpp")
    assert ema.launches_per_step == 1
    ema.step()  # warm: imports, caches
    count, depths = python_calls(ema.step)
    assert depths and max(depths) <= 6, depths
    assert count <= 20, count


@pytest.mark.skipif(
    bound._compiled_class() is None, reason="without the extension the check is a Python loop"
)
def test_a_list_step_makes_as_many_calls_for_100_tensors_as_for_10(tmp_path):
    counts = {}
    for n in (10, 100):
        model = linear_stack(n)
        for averager in averagers(model, tmp_path / str(n), flatten=False):
            averager.step()
            counts.setdefault(type(averager).__name__, []).append(python_calls(averager.step)[0])
    for name, (ten, hundred) in counts.items():
        assert ten == hundred, (name, ten, hundred)


class HostSyncs(TorchDispatchMode):
    """Records every op that copies a device value to the host."""

    SYNCING = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.seen, self.syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.seen.append(name)
        if name in self.SYNCING:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flatten", [True, False])
def test_no_step_reads_a_value_back_to_the_host(tmp_path, flatten):
    model = linear_stack(3)
    for averager in averagers(model, tmp_path, flatten=flatten):
        averager.step()
        with HostSyncs() as mode:
            for _ in range(3):
                averager.step()
        assert mode.seen, type(averager).__name__  # the mode saw the step's ops
        assert not mode.syncs, (type(averager).__name__, mode.syncs)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize(
    "change",
    ["to_double", "assign_state", "one_data", "one_param_replaced", "buffer_replaced"],
)
def test_a_model_that_moved_is_refused_before_any_write(flatten, change):
    for build in (
        lambda m: bk.EMA(m, decay=0.5, flatten=flatten),
        lambda m: bk.Belay(m, alpha=0.1, beta=0.1, flatten=flatten),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
        averager = build(model)
        averager.step()
        shadow = [s.clone() for s in averager.shadow_params()]
        if change == "to_double":
            model.double()
        elif change == "assign_state":
            state = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(state, assign=True)
        elif change == "one_data":
            model[2].weight.data = model[2].weight.data.clone()
        elif change == "one_param_replaced":
            model[2].weight = nn.Parameter(model[2].weight.detach().clone())
        else:
            model[1].running_mean = model[1].running_mean.clone()
        weights = [t.detach().clone() for t in model.state_dict().values()]
        if change == "one_data" and not flatten:
            averager.step()  # a list of the module's own tensors follows their new memory
            assert averager.num_steps == 2
            continue
        with pytest.raises(bk.BelayInputError, match="no longer live|not the ones"):
            averager.step()
        assert all(torch.equal(a, b) for a, b in zip(shadow, averager.shadow_params()))
        assert all(torch.equal(a, b) for a, b in zip(weights, model.state_dict().values()))


def test_the_python_check_finds_what_the_compiled_one_finds(monkeypatch):
    if bound._compiled_class() is None:
        pytest.skip("the compiled extension is not built")
    compiled = bound._compiled_class()
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    named = list(model.named_parameters())
    tables = [model.get_submodule(n.rpartition(".")[0])._parameters for n, _ in named]
    keys = [n.rpartition(".")[2] for n, _ in named]
    tensors = [p for _, p in named]

    def both():
        fast = compiled(tables, keys, tensors, [False] * len(tensors)).first_moved
        monkeypatch.setattr(bound, "_COMPILED", [None])
        slow = bound.BoundTensors(tables, keys, tensors, [False] * len(tensors)).first_moved
        monkeypatch.setattr(bound, "_COMPILED", [compiled])
        return fast, slow

    fast, slow = both()
    assert fast() == slow() == -1
    model[1].weight.data = model[1].weight.data.clone()  # new memory, same object
    assert fast() == slow() == 2
    fast, slow = both()
    assert fast() == slow() == -1
    model[0].bias = nn.Parameter(torch.zeros(3))  # another object in the module
    assert fast() == slow() == 1
    del model[1]._parameters["weight"]  # gone from the module
    assert fast() == slow() == 1


def test_changing_the_policy_or_the_backend_takes_effect_at_the_next_step():
    model = linear_stack(2)
    ema = bk.EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    ema.step()
    assert ema.num_skipped == 1
    ema.nonfinite = "propagate"
    ema.step()
    assert torch.isnan(ema.shadow_params()[0][0, 0])
    with pytest.raises(bk.BelayInputError, match="nonfinite"):
        ema.nonfinite = "ignore"
    assert ema.nonfinite == "propagate"
    ema.backend = "reference"
    ema.step()
    with pytest.raises(bk.BelayInputError, match="backend"):
        ema.backend = "fortran"
    assert ema.backend == "reference"
    with pytest.raises(bk.BelayInputError, match="unavailable|cannot run"):
        ema.backend = "cuda"  # no CUDA kernel for these CPU tensors
    assert ema.backend == "reference"
    ema.step()  # still planned on the reference
