"""The averagers' hyperparameters: the checkpoint form, and one set of checks for the
constructor, load_state_dict and attribute assignment."""

import dataclasses

import pytest
import torch
from torch import nn

import belay_kernels as bk
from belay_kernels import hparams
from belay_kernels.schedules import Warmup


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


# The form checkpoints written before the hyperparameters became dataclasses hold.
SAVED = [
    (
        lambda m, d: bk.EMA(m, decay=0.9, every=2),
        {"schedule": {"kind": "Constant", "decay": 0.9}, "every": 2},
    ),
    (
        lambda m, d: bk.EMA(m, decay=Warmup(decay=0.99)),
        {
            "schedule": {
                "kind": "Warmup",
                "decay": 0.99,
                "gamma": 1.0,
                "power": 2 / 3,
                "min_decay": 0.0,
            },
            "every": 1,
        },
    ),
    (lambda m, d: bk.SWA(m, start=1, every=2), {"start": 1, "every": 2}),
    (
        lambda m, d: bk.Belay.from_physics(m, k=0.1, m1=1.0, m2=2.0),
        {"alpha": 0.025, "beta": 0.05, "eta": 0.5, "form": "post-step"},
    ),
    (lambda m, d: bk.TwoPoint(m, gap=3), {"gap": 3}),
    (lambda m, d: bk.PowerEMA(m, gamma=5.0, every=2), {"gamma": 5.0, "every": 2}),
    (
        lambda m, d: bk.PostHocEMA(
            m,
            sigma_rels=(0.05, 0.10),
            snapshot_every=4,
            snapshot_dir=d,
            snapshot_dtype=torch.bfloat16,
            every=2,
        ),
        {
            "gammas": [16.972198602303447, 6.937203937601809],
            "snapshot_every": 4,
            "snapshot_dtype": "bfloat16",
            "every": 2,
        },
    ),
]
IDS = ["EMA", "EMA-warmup", "SWA", "Belay", "TwoPoint", "PowerEMA", "PostHocEMA"]


@pytest.mark.parametrize("make, saved", SAVED, ids=IDS)
def test_hparams_keep_the_checkpoint_form_and_load_into_a_fresh_averager(make, saved, tmp_path):
    averager = make(model(), tmp_path)
    got = averager.hparams()
    assert list(got) == list(saved)  # the order repr() shows them in
    for key, value in saved.items():
        assert got[key] == (pytest.approx(value) if key == "gammas" else value), key
    state = averager.state_dict()
    state["hparams"] = saved  # as an older version wrote it
    twin = make(model(), tmp_path)
    twin.load_state_dict(state)
    assert twin.hparams() == saved


@pytest.mark.parametrize(
    "make, bad, message",
    [
        (lambda m, d: bk.EMA(m), {"every": 0}, "every must be an int >= 1, got 0"),
        (
            lambda m, d: bk.EMA(m),
            {"schedule": {"kind": "Constant", "decay": 2}},
            r"decay must be in \[0, 1\]",
        ),
        (lambda m, d: bk.SWA(m), {"start": -1}, "start must be an int >= 0"),
        (lambda m, d: bk.Belay(m, alpha=0.1, beta=0.1), {"beta": 2}, r"beta must be in \[0, 1\]"),
        (lambda m, d: bk.TwoPoint(m, gap=2), {"gap": 0}, "gap must be an int >= 1"),
        (lambda m, d: bk.PowerEMA(m, gamma=5.0), {"gamma": -1.0}, "gamma must be a number > 0"),
        (
            lambda m, d: bk.PostHocEMA(m, snapshot_every=4, snapshot_dir=d),
            {"every": 3},
            r"snapshot_every \(4\) must be a multiple of every \(3\)",
        ),
        (lambda m, d: bk.EMA(m), {"bogus": 1}, "the saved hyperparameters .* are malformed"),
        (
            lambda m, d: bk.EMA(m),
            {"schedule": {"kind": "Cosine"}},
            "the saved hyperparameters .* are malformed",
        ),
    ],
)
def test_a_bad_saved_hyperparameter_is_refused_as_the_constructor_refuses_it(
    make, bad, message, tmp_path
):
    averager = make(model(), tmp_path)
    state = averager.state_dict()
    state["hparams"] = {**state["hparams"], **bad}
    twin = make(model(), tmp_path)
    before = twin.hparams()
    with pytest.raises(bk.BelayInputError, match=message):
        twin.load_state_dict(state)
    assert twin.hparams() == before


def test_saved_hyperparameters_that_are_not_a_dict_are_malformed():
    ema = bk.EMA(model())
    state = ema.state_dict()
    state["hparams"] = "decay=0.9"
    with pytest.raises(
        bk.BelayInputError, match="'decay=0.9' are malformed: expected a dict, got str"
    ):
        ema.load_state_dict(state)


def test_assigning_a_hyperparameter_runs_the_constructors_checks(tmp_path):
    ema = bk.EMA(model(), decay=0.9)
    ema.every = 3
    assert ema.hparams()["every"] == 3 and ema.every == 3
    with pytest.raises(bk.BelayInputError, match="every must be an int >= 1, got 0"):
        ema.every = 0
    assert ema.every == 3
    belay = bk.Belay(model(), alpha=0.1, beta=0.2)
    with pytest.raises(bk.BelayInputError, match=r"alpha must be in \[0, 1\]"):
        belay.alpha = 1.5
    belay.eta = 0.25
    assert belay.hparams() == {"alpha": 0.1, "beta": 0.2, "eta": 0.25, "form": "post-step"}
    phema = bk.PostHocEMA(model(), snapshot_every=4, snapshot_dir=tmp_path)
    phema.snapshot_dtype = torch.float32
    assert phema.snapshot_dtype == torch.float32 and phema.hparams()["snapshot_dtype"] == "float32"
    assert isinstance(phema.gammas, list)
    with pytest.raises(bk.BelayInputError, match="snapshot_dtype must be one of"):
        phema.snapshot_dtype = torch.int8


def test_the_hyperparameter_dataclasses_are_frozen_and_checked_when_made():
    with pytest.raises(dataclasses.FrozenInstanceError):
        hparams.SWAHparams().every = 2
    with pytest.raises(bk.BelayInputError, match="gap must be an int >= 1"):
        hparams.TwoPointHparams(gap=0)
    assert hparams.BelayHparams(alpha=1, beta=0).alpha == 1.0  # stored as floats
    assert hparams.EMAHparams.from_state(
        hparams.EMAHparams(every=4).to_state()
    ) == hparams.EMAHparams(every=4)


def test_belay_checkpoints_from_before_the_poster_form_load_as_post_step():
    from belay_kernels.hparams import BelayHparams

    older = BelayHparams.from_state({"alpha": 0.025, "beta": 0.05, "eta": 0.5})
    assert older.form == "post-step"
    with pytest.raises(bk.BelayInputError, match="form must be one of"):
        BelayHparams.from_state({"alpha": 0.025, "beta": 0.05, "form": "pre-step"})
