"""The averagers on real models: peers, checkpoints, swaps, flattening and the list path."""

import copy
import io

import pytest
import torch
from torch import nn

import belay_kernels as bk
from belay_kernels import schedules


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10)
    )
    return model.to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (
            torch.randn(16, 1, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, 10, (16,), generator=g),
        )


def train_step(model, optimizer, x, y):
    loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def state_values(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---- peers ------------------------------------------------------------------------------


def test_ema_matches_averaged_model_and_timm_over_100_steps():
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    peer_avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.97), use_buffers=True)
    peer_avg.update_parameters(model)  # AveragedModel's first update copies: align the start
    peer_timm = ModelEmaV3(model, decay=0.97)
    ema = bk.EMA(model, decay=0.97)
    for x, y in batches(120):
        train_step(model, opt, x, y)
        ema.step()
        peer_avg.update_parameters(model)
        peer_timm.update(model)
    with ema.averaged():
        ours = state_values(model)
    for peer in (peer_avg.module, peer_timm.module):
        theirs = peer.state_dict()
        for name, value in ours.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, theirs[name], atol=1e-6, rtol=1e-5, msg=name)


def test_swa_matches_averaged_model_default_swa():
    from torch.optim.swa_utils import AveragedModel

    model = small_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    peer = AveragedModel(model)
    swa = bk.SWA(model, start=20, every=5, buffers="copy")
    for t, (x, y) in enumerate(batches(110)):
        train_step(model, opt, x, y)
        swa.step()
        if t >= 20 and (t - 20) % 5 == 0:
            peer.update_parameters(model)
    assert swa.num_updates == peer.n_averaged.item() == 18
    for mine, theirs in zip(swa.shadow_params(), peer.module.parameters()):
        torch.testing.assert_close(mine, theirs.detach(), atol=1e-6, rtol=1e-5)


# ---- checkpoints ------------------------------------------------------------------------

AVERAGERS = [
    (bk.EMA, dict(decay=schedules.Warmup(decay=0.99, gamma=2.0), every=2)),
    (bk.SWA, dict(start=3, every=2)),
    (bk.Belay, dict(alpha=0.05, beta=0.2)),
    (bk.TwoPoint, dict(gap=4)),
]
IDS = [cls.__name__ for cls, _ in AVERAGERS]


@pytest.mark.parametrize("cls, kwargs", AVERAGERS, ids=IDS)
def test_resume_from_checkpoint_is_bit_identical(cls, kwargs):
    data = list(batches(30, seed=3))

    def fresh():
        model = small_model(2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, cls(model, **kwargs)

    model, opt, avg = fresh()
    for x, y in data:
        train_step(model, opt, x, y)
        avg.step()
    straight = (state_values(model), [s.clone() for s in avg.shadow_params()])

    model, opt, avg = fresh()
    for x, y in data[:13]:
        train_step(model, opt, x, y)
        avg.step()
    blob = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "avg": avg.state_dict()}, blob
    )
    blob.seek(0)
    del model, opt, avg

    model, opt, avg = fresh()  # different random init, overwritten by the checkpoint
    saved = torch.load(blob, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    avg.load_state_dict(saved["avg"])
    for x, y in data[13:]:
        train_step(model, opt, x, y)
        avg.step()
    assert_bitwise_equal(state_values(model), straight[0])
    for a, b in zip(avg.shadow_params(), straight[1]):
        assert torch.equal(a, b)


def test_load_state_dict_from_another_model_names_the_mismatch_and_changes_nothing():
    ema = bk.EMA(small_model(), decay=0.9)
    other = nn.Sequential(nn.Linear(3, 4))
    state = bk.EMA(other, decay=0.9).state_dict()
    before = [s.clone() for s in ema.shadow_params()]
    with pytest.raises(bk.BelayInputError, match=r"shadow missing: \['1.weight'") as info:
        ema.load_state_dict(state)
    assert r"0.weight: saved shape (4, 3), model shape (6, 1, 3, 3)" in str(info.value)
    reshaped = ema.state_dict()
    reshaped = {**reshaped, "shadow": {**reshaped["shadow"], "4.bias": torch.zeros(11)}}
    with pytest.raises(
        bk.BelayInputError, match=r"4.bias: saved shape \(11,\), model shape \(10,\)"
    ):
        ema.load_state_dict(reshaped)
    with pytest.raises(
        bk.BelayInputError, match="this averager is EMA, but the state is from 'SWA'"
    ):
        ema.load_state_dict(bk.SWA(small_model()).state_dict())
    for a, b in zip(ema.shadow_params(), before):
        assert torch.equal(a, b)


# ---- evaluation -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls, kwargs", AVERAGERS, ids=IDS)
def test_averaged_swaps_in_the_average_and_restores_the_model_bit_exactly(cls, kwargs, dtype):
    model = small_model(4, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = cls(model, **kwargs)
    for x, y in batches(9, dtype=dtype):
        train_step(model, opt, x, y)
        avg.step()
    live = state_values(model)
    expected = [v.to(dtype, copy=True) for v in avg._averaged_values()]
    with avg.averaged() as inside:
        assert inside is model
        for name, value in zip(avg.names(), expected):
            torch.testing.assert_close(
                model.get_parameter(name) if "running" not in name else model.get_buffer(name),
                value,
                atol=0,
                rtol=2**-7,
            )
        with pytest.raises(bk.BelayInputError, match="inside averaged"):
            avg.step()
    assert_bitwise_equal(state_values(model), live)


def test_averaged_restores_the_model_even_when_evaluation_raises():
    model = small_model()
    ema = bk.EMA(model, decay=0.5)
    model[0].weight.data.add_(1.0)
    live = state_values(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.averaged():
            raise RuntimeError("boom")
    assert_bitwise_equal(state_values(model), live)
    ema.step()  # usable again


def test_copy_to_writes_the_average_into_another_model():
    model = small_model()
    ema = bk.EMA(model, decay=0.5, buffers="copy")
    with torch.no_grad():
        model[4].weight.add_(2.0)
    ema.step()
    target = small_model(seed=9)
    ema.copy_to(target)
    torch.testing.assert_close(target[4].weight, ema.shadow_params()[-2])
    assert torch.equal(target[1].running_var, model[1].running_var)  # copied, not averaged
    assert torch.equal(target[1].num_batches_tracked, model[1].num_batches_tracked)


# ---- flattening -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["SGD", "AdamW"],
)
@pytest.mark.parametrize("optimizer_first", [True, False], ids=["opt-before", "opt-after"])
def test_flattening_leaves_training_bit_identical(make_opt, optimizer_first):
    plain = small_model(5)
    flat = copy.deepcopy(plain)
    opt_plain = make_opt(plain.parameters())
    if optimizer_first:
        opt_flat = make_opt(flat.parameters())
        ema = bk.EMA(flat, decay=0.9)
    else:
        ema = bk.EMA(flat, decay=0.9)
        opt_flat = make_opt(flat.parameters())
    assert ema.launches_per_step == 1  # one buffer for all params and float buffers
    assert list(plain.state_dict()) == list(flat.state_dict())
    for x, y in batches(25, seed=6):
        train_step(plain, opt_plain, x, y)
        train_step(flat, opt_flat, x, y)
        ema.step()
    assert_bitwise_equal(state_values(plain), state_values(flat))


def test_params_live_in_one_buffer_per_device_and_dtype():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model[1].to(torch.float64)
    ema = bk.EMA(model, decay=0.9)
    assert ema.launches_per_step == 2
    storages = {p.untyped_storage().data_ptr() for p in model[0].parameters()}
    assert len(storages) == 1


def test_tied_parameters_are_counted_once():
    model = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11, bias=False))
    model[1].weight = model[0].weight
    ema = bk.EMA(model, decay=0.9)
    assert ema.names() == ["0.weight"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.step()
    torch.testing.assert_close(ema.shadow_params()[0], model[0].weight - 0.9)


def test_frozen_parameters_can_be_left_out():
    model = small_model()
    model[0].requires_grad_(False)
    assert "0.weight" in bk.EMA(model).names()
    names = bk.EMA(model, include_frozen=False, buffers="copy").names()
    assert names == ["4.weight", "4.bias", "1.weight", "1.bias"] or set(names) == {
        "1.weight",
        "1.bias",
        "4.weight",
        "4.bias",
    }


def test_buffers_averaged_or_copied_and_integer_buffers_never_averaged():
    model = small_model()
    averaged = bk.EMA(model, decay=0.9).names()
    assert "1.running_mean" in averaged and "1.num_batches_tracked" not in averaged
    assert "1.running_mean" not in bk.EMA(small_model(), buffers="copy").names()


def test_half_precision_weights_get_an_fp32_shadow_by_default():
    model = small_model(dtype=torch.bfloat16)
    ema = bk.EMA(model)
    assert {s.dtype for s in ema.shadow_params()} == {torch.float32}
    assert (
        bk.EMA(small_model(dtype=torch.bfloat16), shadow_dtype=torch.bfloat16)
        .shadow_params()[0]
        .dtype
        == torch.bfloat16
    )
    n = sum(p.numel() for p in model.parameters()) + 12  # + BatchNorm's running stats
    assert ema.state_bytes == 4 * n
    assert "averager state" in ema.memory_report()


@pytest.mark.parametrize("flatten", [True, False])
def test_state_bytes_count_every_tensor_a_track_owns(flatten, tmp_path):
    n = sum(p.numel() for p in small_model().parameters()) + 12  # + BatchNorm's running stats
    assert (
        bk.TwoPoint(small_model(), gap=2, flatten=flatten).state_bytes == 2 * 4 * n
    )  # snapshot, average
    phema = bk.PostHocEMA(
        small_model(),
        sigma_rels=(0.05, 0.10, 0.15),
        snapshot_every=2,
        snapshot_dir=tmp_path,
        flatten=flatten,
    )
    assert phema.state_bytes == 3 * 4 * n
    report = phema.memory_report().splitlines()
    assert report[-2] == f"total averager state: {3 * 4 * n / 2**10:.2f} KiB"
    # three fp16 copies, made when the first snapshot is written
    assert report[-1] == (
        f"snapshot staging on the CPU, from the first snapshot: {3 * 2 * n / 2**10:.2f} KiB"
    )


def test_tensors_that_cannot_be_flattened_take_the_list_path_with_the_same_results():
    torch.manual_seed(0)
    strided = nn.Parameter(torch.randn(6, 5).t())  # not contiguous
    plain = nn.Parameter(torch.randn(9))
    twins = [nn.Parameter(strided.detach().contiguous()), nn.Parameter(plain.detach().clone())]
    # one backend for both: "auto" would run the strided tensor on torch and the flat
    # buffer on cpp, whose lerps round alike only where ATen's is fused (AVX2 and up)
    listed = bk.Belay([strided, plain], alpha=0.1, beta=0.3, backend="torch")
    flat = bk.Belay(twins, alpha=0.1, beta=0.3, backend="torch")
    assert listed.launches_per_step == 2 and flat.launches_per_step == 1
    for _ in range(5):
        with torch.no_grad():
            for p, q in zip([strided, plain], twins):
                noise = torch.randn(p.shape)
                p.add_(noise)
                q.add_(noise)
        listed.step()
        flat.step()
    for p, q in zip([strided, plain], twins):
        assert torch.equal(p, q)
    for a, b in zip(listed.shadow_params(), flat.shadow_params()):
        assert torch.equal(a, b)


def test_step_after_the_model_was_moved_raises_and_changes_nothing():
    model = small_model()
    ema = bk.EMA(model, decay=0.9)
    before = [s.clone() for s in ema.shadow_params()]
    model.double()  # replaces every parameter's .data
    with pytest.raises(bk.BelayInputError, match="no longer live in the averager's flat buffer"):
        ema.step()
    for a, b in zip(ema.shadow_params(), before):
        assert torch.equal(a, b)


def test_two_averagers_share_one_flat_buffer():
    model = small_model()
    ema, swa = bk.EMA(model, decay=0.9), bk.SWA(model)
    assert ema.launches_per_step == swa.launches_per_step == 1
    ema.step()
    swa.step()


# ---- methods ----------------------------------------------------------------------------


def test_belay_pulls_the_model_and_reduces_to_ema_at_zero_beta():
    a, b = small_model(7), small_model(7)
    belay = bk.Belay(a, alpha=0.2, beta=0.0)
    ema = bk.EMA(b, decay=0.8)
    for _batch, _ in zip(batches(5), range(5)):
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()):
                step = torch.randn_like(p)
                p.add_(step)
                q.add_(step)
        belay.step()
        ema.step()
    assert_bitwise_equal(state_values(a), state_values(b))
    for s, t in zip(belay.shadow_params(), ema.shadow_params()):
        assert torch.equal(s, t)


def test_belay_from_physics():
    belay = bk.Belay.from_physics(small_model(), k=0.2, m1=1.0, m2=10.0)
    assert (belay.alpha, belay.beta, belay.eta) == (0.01, 0.1, 0.5)
    with pytest.raises(bk.BelayInputError, match="m1 >= k / 2"):
        bk.Belay.from_physics(small_model(), k=3.0, m1=1.0, m2=10.0)
    with pytest.raises(bk.BelayInputError, match="m2 must be a positive number"):
        bk.Belay.from_physics(small_model(), k=0.2, m1=1.0, m2=0)


def test_ema_schedules():
    warm = schedules.Warmup(decay=0.999, gamma=1.0, power=1.0, min_decay=0.1)
    assert warm.decay_at(0) == 0.1 and warm.decay_at(1) == 0.5 and warm.decay_at(10**6) == 0.999
    assert schedules.half_life(10).decay ** 10 == pytest.approx(0.5)
    ema = bk.EMA(small_model(), decay=0.9, every=3)
    assert ema.decay_at(0) == pytest.approx(0.9**3)
    for _ in range(7):
        ema.step()
    assert ema.num_updates == 3  # steps 0, 3, 6


def test_two_point_snapshot_and_average():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    tp = bk.TwoPoint([p], gap=2)
    with torch.no_grad():
        p.add_(2.0)
    tp.step()  # age 1: snapshot still the start
    assert tp.snapshot_age == 1
    with tp.averaged():
        assert torch.equal(p, torch.tensor([2.0, 3.0]))
    with torch.no_grad():
        p.add_(2.0)
    tp.step()  # age reached 2: retaken
    assert tp.snapshot_age == 0
    assert torch.equal(tp.shadow_params()[0], torch.tensor([5.0, 6.0]))


def test_nonfinite_weights_are_skipped_and_counted_by_the_averager():
    p = nn.Parameter(torch.ones(10))
    ema = bk.EMA([p], decay=0.5)
    with torch.no_grad():
        p[2] = float("nan")
        p[5] = 3.0
    ema.step()
    assert ema.num_skipped == 1
    assert ema.shadow_params()[0][2] == 1.0 and ema.shadow_params()[0][5] == 2.0


# ---- bad input to the averagers -----------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: bk.EMA(m, decay=1.5), r"decay must be in \[0, 1\], got 1.5"),
        (lambda m: bk.EMA(m, decay=float("nan")), r"decay must be in \[0, 1\], got nan"),
        (lambda m: bk.EMA(m, decay=0.9, half_life=10), "not both"),
        (lambda m: bk.EMA(m, every=0), "every must be an int >= 1"),
        (lambda m: bk.Belay(m, alpha=-0.1, beta=0.1), r"alpha must be in \[0, 1\]"),
        (lambda m: bk.Belay(m, alpha=0.1, beta=2), r"beta must be in \[0, 1\]"),
        (lambda m: bk.SWA(m, start=-1), "start must be an int >= 0"),
        (lambda m: bk.TwoPoint(m, gap=0), "gap must be an int >= 1"),
        (lambda m: bk.EMA(m, buffers="sometimes"), "buffers must be one of"),
        (lambda m: bk.EMA(m, nonfinite="ignore"), "nonfinite must be one of"),
        (lambda m: bk.EMA(m, backend="cuda-graph"), "backend must be 'auto' or one of"),
        (lambda m: bk.EMA(m[0].weight), "not a single tensor"),
        (lambda m: bk.EMA([{"params": []}]), "param-group dicts are not supported"),
    ],
)
def test_bad_averager_settings_raise_before_the_model_is_touched(make, message):
    model = small_model()
    storages = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(bk.BelayInputError, match=message):
        make(model)
    assert storages == [p.data_ptr() for p in model.parameters()]  # not flattened
