"""A user's mistakes that must stay recoverable: the model moved after its averager was
built (the stale-view message names the steps, and those steps work), and a generator of
parameters that an earlier averager already used up."""

import re
import warnings

import pytest
import torch
from torch import nn

import belay_kernels as bk
from belay_kernels.averagers import StaleViewsWarning


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _train(model, averager, steps):
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        averager.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: bk.EMA(m, decay=0.9),
        lambda m: bk.SWA(m),
        lambda m: bk.Belay(m, alpha=0.1, beta=0.05),
        lambda m: bk.TwoPoint(m, gap=3),
    ],
    ids=["EMA", "SWA", "Belay", "TwoPoint"],
)
def test_after_model_to_the_named_recovery_steps_keep_the_average(make):
    model = _model()
    averager = make(model)
    _train(model, averager, 5)
    shadow = [s.clone() for s in averager.shadow_params()]
    model.to(torch.float64)

    with pytest.raises(bk.BelayInputError) as refused:
        averager.step()
    message = str(refused.value)
    # the steps, in order
    steps = [message.index(f"({i})") for i in (1, 2, 3)]
    assert steps == sorted(steps)
    assert re.search(
        r"\(1\) state = averager\.state_dict\(\).*\(2\) averager = "
        rf"belay_kernels\.{averager.method}\(model, \.\.\.\).*\(3\) "
        r"averager\.load_state_dict\(state\)",
        message,
    )

    # (1) state_dict() works, and says the views are stale
    with pytest.warns(StaleViewsWarning, match="views of them are stale"):
        state = averager.state_dict()
    # (2) a new averager of the same kind on the moved model, (3) load the state
    rebuilt = make(model)
    rebuilt.load_state_dict(state)
    assert rebuilt.launches_per_step == averager.launches_per_step  # flattened again
    assert rebuilt.num_steps == 5 and rebuilt.num_updates == averager.num_updates
    for moved, before in zip(rebuilt.shadow_params(), shadow):
        assert moved.dtype == torch.float64
        assert torch.equal(moved, before.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt averager is not stale
        _train(model, rebuilt, 2)
        rebuilt.state_dict()
    assert rebuilt.num_steps == 7


def test_state_dict_inside_averaged_still_refuses():
    model = _model()
    ema = bk.EMA(model, decay=0.9)
    with ema.averaged(), pytest.raises(bk.BelayInputError, match="inside averaged()"):
        ema.state_dict()


def test_a_used_up_generator_says_what_happened():
    model = _model()
    parameters = model.parameters()
    bk.EMA(parameters, decay=0.9)  # reads the generator to its end
    with pytest.raises(
        bk.BelayInputError,
        match=re.escape("the iterable was empty; was model.parameters() already consumed?"),
    ):
        bk.SWA(parameters)
    # an empty list is not a used-up generator: the old message stands
    with pytest.raises(bk.BelayInputError, match="there is nothing to average"):
        bk.EMA([], decay=0.9)
