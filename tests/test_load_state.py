"""``load_state_dict`` checks everything it will read before it writes anything: every key,
type, counter range, hyperparameter, tensor shape and dtype, for every averager. A bad
state raises BelayInputError naming the field and leaves the averager exactly as it was
(its tensors bit for bit, its counters, hyperparameters and policy)."""

from __future__ import annotations

import copy

import pytest
import torch
from _untouched import Snapshot
from torch import nn

import belay_kernels as bk
from belay_kernels import BelayInputError
from belay_kernels.schedules import Warmup


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def _averagers(tmp_path):
    """(name, factory) for every averager class; factory(model) builds it."""
    return {
        "EMA": lambda m: bk.EMA(m, decay=Warmup(decay=0.99, gamma=3.0)),
        "SWA": lambda m: bk.SWA(m, start=1),
        "Belay": lambda m: bk.Belay(m, alpha=0.1, beta=0.05),
        "TwoPoint": lambda m: bk.TwoPoint(m, gap=2),
        "PowerEMA": lambda m: bk.PowerEMA(m, sigma_rel=0.1),
        "PostHocEMA": lambda m: bk.PostHocEMA(
            m, sigma_rels=(0.05, 0.1), snapshot_every=100, snapshot_dir=tmp_path / "snap"
        ),
    }


KINDS = ("EMA", "SWA", "Belay", "TwoPoint", "PowerEMA", "PostHocEMA")


def _train(model: nn.Module, averager, steps: int, seed: int) -> None:
    """Moves every weight and running statistic; one step puts a NaN into a weight."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            model.train()
            model(torch.randn(9, 5, generator=gen))  # BatchNorm's running statistics
            if t == 1:
                model[0].weight[0, 0] = float("nan")
        averager.step()
        with torch.no_grad():
            if t == 1:
                model[0].weight[0, 0] = 0.5


def _saved_state(kind, tmp_path):
    model = _model()
    averager = _averagers(tmp_path)[kind](model)
    _train(model, averager, 5, seed=1)
    state = averager.state_dict()
    if kind != "TwoPoint":  # TwoPoint's snapshot copies, so it counts nothing
        assert state["num_skipped"] > 0
    return copy.deepcopy(state)


def _victim(kind, tmp_path):
    """An averager with its own history, different from the saved one in every field."""
    model = _model()
    averager = _averagers(tmp_path)[kind](model)
    _train(model, averager, 3, seed=2)
    return averager


def _everything(averager) -> dict:
    return {
        "hparams": averager.hparams(),
        "nonfinite": averager.nonfinite,
        "num_steps": averager.num_steps,
        "num_updates": averager.num_updates,
        "num_skipped": averager.num_skipped,
        "snapshot_age": getattr(averager, "snapshot_age", None),
        "num_snapshots": getattr(averager, "num_snapshots", None),
    }


TENSOR_KINDS = {"TwoPoint": ("snapshot",), "PostHocEMA": ("profile_0", "profile_1")}


def _tensor_kinds(kind) -> tuple[str, ...]:
    return TENSOR_KINDS.get(kind, ("shadow",))


def _corruptions(kind):
    """(label, the field the message must name, a function corrupting a copy of state)."""

    def drop(key):
        return lambda s: s.pop(key)

    def put(key, value):
        return lambda s: s.__setitem__(key, value)

    counters = ["num_steps", "num_updates", "num_skipped"]
    counters += {"TwoPoint": ["snapshot_step"], "PostHocEMA": ["num_snapshots"]}.get(kind, [])
    out = [
        ("not a dict", "state is from", lambda s: s.clear()),
        ("another method", "state is from", put("method", "SWA" if kind != "SWA" else "EMA")),
        ("another format", "format", put("format", 99)),
        ("bad nonfinite", "nonfinite", put("nonfinite", "ignore")),
        ("hparams not a dict", "hyperparameters", put("hparams", [1, 2])),
        ("hparams unknown field", "hyperparameters", lambda s: s["hparams"].update(bogus=1)),
        ("updates beyond steps", "num_updates", lambda s: s.update(num_updates=s["num_steps"] + 1)),
    ]
    for key in ["hparams", "nonfinite", *counters]:
        out.append((f"no {key}", key, drop(key)))
    for key in counters:
        for bad in ("7", -1, 2.0, True, None):
            out.append((f"{key}={bad!r}", key, put(key, bad)))
    bad_hparam = {
        "EMA": ("every", 0),
        "SWA": ("start", -1),
        "Belay": ("alpha", 1.5),
        "TwoPoint": ("gap", 0),
        "PowerEMA": ("gamma", -1.0),
        "PostHocEMA": ("snapshot_every", 0),
    }[kind]
    out.append(
        (f"hparams {bad_hparam}", bad_hparam[0], lambda s: s["hparams"].update([bad_hparam]))
    )
    if kind == "EMA":
        out.append(
            (
                "schedule of unknown kind",
                "hyperparameters",
                lambda s: s["hparams"]["schedule"].update(kind="Cosine"),
            )
        )
        out.append(
            (
                "schedule value not a number",
                "hyperparameters",
                lambda s: s["hparams"]["schedule"].update(gamma="x"),
            )
        )
    if kind == "TwoPoint":
        out.append(("snapshot after the last step", "snapshot_step", put("snapshot_step", 10**6)))
    if kind == "PostHocEMA":
        out.append(
            (
                "another number of profiles",
                "profiles",
                lambda s: s["hparams"].update(gammas=[*s["hparams"]["gammas"], 40.0]),
            )
        )
    for tensor_kind in _tensor_kinds(kind):
        name = "0.weight"
        entry = f"{tensor_kind} {name}"
        out += [
            (f"no {tensor_kind}", tensor_kind, drop(tensor_kind)),
            (
                f"{tensor_kind} missing {name}",
                tensor_kind,
                lambda s, k=tensor_kind, n=name: s[k].pop(n),
            ),
            (
                f"{tensor_kind} extra name",
                "unexpected",
                lambda s, k=tensor_kind: s[k].__setitem__("extra.weight", torch.ones(2)),
            ),
            (
                f"{entry} not a tensor",
                entry,
                lambda s, k=tensor_kind, n=name: s[k].__setitem__(n, s[k][n].tolist()),
            ),
            (
                f"{entry} integer",
                entry,
                lambda s, k=tensor_kind, n=name: s[k].__setitem__(n, s[k][n].long()),
            ),
            (
                f"{entry} reshaped",
                entry,
                lambda s, k=tensor_kind, n=name: s[k].__setitem__(n, s[k][n].reshape(-1)[:-1]),
            ),
        ]
    return out


CASES = [
    pytest.param(kind, label, field, id=f"{kind}-{label}")
    for kind in KINDS
    for label, field, _ in _corruptions(kind)
]


@pytest.mark.parametrize(("kind", "label", "field"), CASES)
def test_a_bad_state_is_refused_naming_the_field_and_nothing_changes(kind, label, field, tmp_path):
    state = _saved_state(kind, tmp_path)
    corrupt = {lbl: fn for lbl, _, fn in _corruptions(kind)}[label]
    corrupt(state)
    averager = _victim(kind, tmp_path)
    before = _everything(averager)
    tensors = Snapshot(*averager._saved_tensors().values())
    with pytest.raises(BelayInputError, match=field.replace("(", r"\(").replace(")", r"\)")):
        averager.load_state_dict(state)
    tensors.assert_unchanged()
    assert _everything(averager) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_good_state_restores_every_field(kind, tmp_path):
    state = _saved_state(kind, tmp_path)
    averager = _victim(kind, tmp_path)
    averager.load_state_dict(copy.deepcopy(state))
    again = averager.state_dict()
    assert _everything(averager)["num_skipped"] == state["num_skipped"]
    for key in ("hparams", "nonfinite", "num_steps", "num_updates", "num_skipped"):
        assert again[key] == state[key], key
    for key in ("snapshot_step", "num_snapshots"):
        assert again.get(key) == state.get(key), key
    for tensor_kind in _tensor_kinds(kind):
        assert state[tensor_kind].keys() == again[tensor_kind].keys()
        for name, value in state[tensor_kind].items():
            assert torch.equal(again[tensor_kind][name], value), (tensor_kind, name)
