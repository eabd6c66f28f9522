"""An averager notices when the module holds other tensor objects than it was built on."""

import pytest
import torch
from torch import nn

import belay_kernels as bk


def test_step_after_load_state_dict_assign_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    ema = bk.EMA(model, decay=0.5)
    shadow = [s.clone() for s in ema.shadow_params()]
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects
    with pytest.raises(
        bk.BelayInputError, match=r"0\.weight, 0\.bias.*not the ones the averager was built on"
    ):
        ema.step()
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow_params()))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_averagers_on_a_model_and_on_its_wrapper_keep_their_own_names():
    model = nn.Sequential(nn.Linear(4, 5))
    wrapper = nn.ModuleDict({"inner": model})
    first, second = bk.EMA(model), bk.EMA(wrapper)  # the second reuses the flat buffer
    assert first.names() == ["0.weight", "0.bias"]
    assert second.names() == ["inner.0.weight", "inner.0.bias"]
    assert list(second.state_dict()["shadow"]) == second.names()
