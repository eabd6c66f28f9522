"""Hyperparameters given as tensors on a device the kernels cannot read (another device
than the tensors') are refused before anything is written; a CPU scalar is accepted by
every backend. The "other device" here is ``meta``: the check is the same for cuda:1."""

import pytest
import torch

import belay_kernels as bk
from belay_kernels import ops

OTHER = torch.device("meta")


def _cases():
    yield "decay", lambda s, w, v: ops.ema_update_(s, w, decay=v), 0.9
    yield "count", lambda s, w, v: ops.swa_update_(s, w, count=v), 3
    yield "alpha", lambda s, w, v: ops.belay_step_(w, s, alpha=v, beta=0.5), 0.1
    yield "beta", lambda s, w, v: ops.belay_step_(w, s, alpha=0.1, beta=v), 0.1


CASES = list(_cases())


@pytest.mark.parametrize("listed", [False, True], ids=["flat", "list"])
@pytest.mark.parametrize("name, call, value", CASES, ids=[c[0] for c in CASES])
def test_a_scalar_on_another_device_is_refused_before_anything_is_written(
    name, call, value, listed
):
    shadow, weights = torch.linspace(0, 1, 37), torch.linspace(1, 2, 37)
    before = (shadow.clone(), weights.clone())
    scalar = torch.tensor(value, device=OTHER)
    args = ([shadow], [weights]) if listed else (shadow, weights)
    with pytest.raises(bk.BelayInputError, match=f"{name} is on meta but the tensors are on cpu"):
        call(*args, scalar)
    assert torch.equal(shadow, before[0]) and torch.equal(weights, before[1])


@pytest.mark.parametrize("name, call, value", CASES, ids=[c[0] for c in CASES])
def test_a_cpu_scalar_is_accepted(name, call, value):
    shadow, weights = torch.linspace(0, 1, 37), torch.linspace(1, 2, 37)
    expected = (shadow.clone(), weights.clone())
    as_tensor = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else None)
    call(shadow, weights, as_tensor)
    call(*expected, value)
    assert torch.equal(shadow, expected[0]) and torch.equal(weights, expected[1])
