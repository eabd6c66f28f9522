"""Tests that kill the one-line mutations of issue 25's audit, each of which left the whole
suite green:

1. the two-point average without the upcast to the math dtype (fp16 60000 + 60000 -> inf);
2. ``_owns_its_storage`` dropped from ``flat.can_flatten`` (views of one storage moved);
3. ``Warmup`` with ``t * gamma`` in place of ``t / gamma``;
4. ``num_skipped`` not restored by ``load_state_dict``;
5. ``Belay``'s floating buffers averaged with the wrong decay (or pulled by the spring);
6. the snapshot kind/format check dropped from ``posthoc.read_snapshot``;
7. every rank restoring ``num_skipped`` under a sharded shadow (DDP ``shard_shadow=True``
   and FSDP2), where ``state_dict()`` saves the sum over the ranks.

Every expected value is computed here, in float64, from the formulas in docs/methods.md,
never from the library's own helpers. Each test was checked by applying its mutation to
the source and seeing it fail. Two bugs were found on the way: two tensors over one whole
storage were flattened apart (fixed, ``test_2_two_tensors_over_one_whole_storage...``), and
the two-point average of two finite values near the top of fp32's range overflows (kept as
an xfail(strict=True) until the kernels compute ``w/2 + s/2``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from _distributed_models import local, tiny
from _grid import simulated_grid
from _untouched import cpu_backends
from torch import nn

import belay_kernels as bk
from belay_kernels import BelayInputError, ops, posthoc, schedules, snapshots
from belay_kernels.testing import assert_close

CPU_BACKENDS = cpu_backends()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 1. the two-point average computes in the math dtype --------------------------------

# "reference" is the spec itself; "grid" runs the compiled CUDA bodies (belay_math.h) on a
# simulated grid on the CPU, so the CUDA kernels' arithmetic is covered without a GPU.
# Under TRITON_INTERPRET=1 (set before triton is imported) the Triton kernel joins them.
TWO_POINT_BACKENDS = ["reference"] + CPU_BACKENDS + (["grid"] if "cpp" in CPU_BACKENDS else [])
if os.environ.get("TRITON_INTERPRET") == "1":
    import _triton_interpreter

    _triton_interpreter.round_bf16_like_the_gpu()  # the GPU's rounding, not truncation
    TWO_POINT_BACKENDS.append("triton")
SIZES = (1, 3, 31, 1009, 70_001)


def _backend_context(backend):
    if backend == "grid":
        return "cpp", simulated_grid(3, 32)
    return backend, contextlib.nullcontext()


def _fp16_overflowing_pairs(n: int, g: torch.Generator):
    """fp16 pairs of one sign with magnitudes in [33000, 65504]: every sum passes fp16's
    largest finite value (65504), while the average is finite. Every fifth pair is an
    ordinary one (magnitudes in [0.5, 4], where fp32 adds fp16 exactly)."""
    mags = torch.rand(2, n, generator=g, dtype=torch.float64)
    big = 33000 + (65504 - 33000) * mags
    small = 0.5 + 3.5 * mags
    ordinary = torch.arange(n) % 5 == 4
    mags = torch.where(ordinary, small, big)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    w, s = (sign * mags).to(torch.float16)
    return w, s, ~ordinary


def _bf16_overflowing_pairs(n: int, g: torch.Generator):
    """bf16 pairs whose sum is 2^128 - 2^119: above bf16's rounding threshold to inf
    (bf16's largest finite value is 2^128 - 2^120), but exact in fp32, whose range ends at
    2^128 - 2^104. That is the only sum of bf16 values in that window, so the pairs are
    x = 2^127 + k 2^120 (k < 128) and y = 2^128 - 2^119 - x, in random order and sign.
    The average 2^127 - 2^118 rounds (a tie, to even) to 2^127 in bf16. Every fifth pair
    is ordinary, as for fp16."""
    k = torch.randint(0, 128, (n,), generator=g).double()
    x = 2.0**127 + k * 2.0**120
    y = (2.0**128 - 2.0**119) - x
    assert torch.equal(x.to(torch.bfloat16).double(), x)  # both exact in bf16
    assert torch.equal(y.to(torch.bfloat16).double(), y)
    flip = torch.rand(n, generator=g) < 0.5
    x, y = torch.where(flip, y, x), torch.where(flip, x, y)
    ordinary = torch.arange(n) % 5 == 4
    small = 0.5 + 3.5 * torch.rand(2, n, generator=g, dtype=torch.float64)
    x, y = torch.where(ordinary, small[0], x), torch.where(ordinary, small[1], y)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * x).to(torch.bfloat16), (sign * y).to(torch.bfloat16), ~ordinary


@pytest.mark.parametrize("layout", ["flat", "list"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", TWO_POINT_BACKENDS)
def test_1_a_two_point_average_whose_sum_overflows_the_storage_dtype_is_finite(
    backend, dtype, layout
):
    """Kills ``(w + s) * 0.5`` summed in the storage dtype (reference.py, which the torch
    backend runs chunk by chunk; belay_math.h's ``two_point`` for cpp and grid)."""
    make = _fp16_overflowing_pairs if dtype == torch.float16 else _bf16_overflowing_pairs
    g = _generator(11)
    rows = [make(n, g) for n in SIZES]
    for w, s, overflowing in rows:
        # the data really do overflow the storage dtype: without the upcast, inf
        assert torch.isinf((w + s)[overflowing]).all()
        assert torch.isfinite(w.float() + s.float()).all()
    weights = [w for w, _, _ in rows]
    snapshots = [s for _, s, _ in rows]
    # ``out`` starts as garbage (finite, not zero), so every element must be written
    outs = [torch.randn(w.shape, generator=g).to(dtype) for w in weights]
    expected = [((w.double() + s.double()) / 2).to(dtype) for w, s in zip(weights, snapshots)]
    name, context = _backend_context(backend)
    with context:
        if layout == "list":
            ops.two_point_average(weights, snapshots, out=outs, backend=name)
        else:
            for w, s, out in zip(weights, snapshots, outs):
                ops.two_point_average(w, s, out=out, backend=name)
    for out, exp, (_, _, overflowing) in zip(outs, expected, rows):
        assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite"
        # fp32 adds two fp16 or two of these bf16 values exactly and halves exactly, so
        # the one rounding is the store's: bit for bit the float64 average, rounded
        assert torch.equal(out, exp)
        if dtype == torch.bfloat16:
            assert (out[overflowing].double().abs() == 2.0**127).all()


@pytest.mark.xfail(
    strict=True,
    reason="bug on main (issue 25): the two-point average is (w + s) * 0.5 in fp32, whose "
    "range bf16 shares, so two finite bf16 (or fp32) weights near the largest value average "
    "to inf; w * 0.5 + s * 0.5 or w + (s - w) * 0.5 would stay finite",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", TWO_POINT_BACKENDS)
def test_1_a_two_point_average_whose_sum_overflows_fp32_is_finite(backend, dtype):
    g = _generator(12)
    top = torch.finfo(dtype).max
    # magnitudes in the top eighth of the range: every sum overflows fp32 too
    w = (top * (1 - torch.rand(37, generator=g, dtype=torch.float64) / 8)).to(dtype)
    s = (top * (1 - torch.rand(37, generator=g, dtype=torch.float64) / 8)).to(dtype)
    name, context = _backend_context(backend)
    with context:
        out = ops.two_point_average(w, s, backend=name)
    assert torch.isfinite(out).all(), f"{int(torch.isinf(out).sum())} of 37 averages are inf"
    assert torch.equal(out, ((w.double() + s.double()) / 2).to(dtype))


# --- 2. tensors that share a storage are never moved --------------------------------------


def _module_over_one_storage(g):
    """Two parameters and a floating buffer that are views into one storage, and one
    parameter with a storage of its own (which is flattened: the control)."""
    base = torch.randn(41, generator=g)
    module = nn.Module()
    module.a = nn.Parameter(base[:12].view(3, 4))
    module.b = nn.Parameter(base[13:30])  # offset 13, in the middle of the storage
    module.register_buffer("stat", base[31:38])
    module.own = nn.Parameter(torch.randn(5, 3, generator=g))
    return base, module


@pytest.mark.parametrize("method", ["EMA", "Belay"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_2_parameters_that_are_views_of_one_storage_are_averaged_and_not_moved(backend, method):
    """Kills ``can_flatten`` without ``_owns_its_storage``: the views would be copied into
    a flat buffer, and the storage they shared would no longer be the model's."""
    g = _generator(21)
    base, module = _module_over_one_storage(g)
    shared = ["a", "b", "stat"]
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    pointers = {n: tensors[n].data_ptr() for n in tensors}
    alpha, beta = 0.3, 0.2
    if method == "EMA":
        averager = bk.EMA(module, decay=1 - alpha, backend=backend)
    else:
        averager = bk.Belay(module, alpha=alpha, beta=beta, backend=backend)
    for n in shared:
        assert tensors[n].data_ptr() == pointers[n], f"{n} was moved"
        assert tensors[n].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    # the control: a tensor with a storage of its own is flattened, so flattening is on
    assert module.own.data_ptr() != pointers["own"]
    names = averager.names()
    oracle = {n: tensors[n].detach().double().clone() for n in names}
    for _ in range(4):
        with torch.no_grad():  # the optimizer writes through the shared storage
            base.add_(torch.randn(base.shape, generator=g))
            module.own.add_(torch.randn(module.own.shape, generator=g))
        before = {n: tensors[n].detach().double().clone() for n in names}
        averager.step()
        for n in names:
            w = before[n]
            if method == "Belay" and n != "stat":  # the spring pulls parameters only
                w_pulled = w + beta * (oracle[n] - w)
            else:
                w_pulled = w
            oracle[n] = oracle[n] + alpha * (w - oracle[n])
            assert_close(tensors[n].detach(), w_pulled, f"{method} weights {n}")
    for n, s in zip(names, averager.shadow_params()):
        assert_close(s, oracle[n], f"{method} shadow {n}")
    # the sharing is intact: the storage holds what the parameters hold
    assert torch.equal(base[:12].view(3, 4), module.a.detach())
    assert torch.equal(base[13:30], module.b.detach())
    assert torch.equal(base[31:38], module.stat)
    for n in shared:
        assert tensors[n].data_ptr() == pointers[n], f"{n} was moved by step()"


@pytest.mark.parametrize("alias", ["parameter", "buffer"])
def test_2_two_tensors_over_one_whole_storage_keep_sharing_it(alias):
    g = _generator(22)
    x = torch.randn(5, 3, generator=g)
    module = nn.Module()
    module.p = nn.Parameter(x)
    if alias == "parameter":
        module.q = nn.Parameter(x)  # a second Parameter object over the same memory
        other = lambda: module.q
    else:
        module.register_buffer("alias", x.view(-1))
        other = lambda: module.alias
    bk.EMA(module, decay=0.5)
    assert module.p.data_ptr() == other().data_ptr() == x.data_ptr()


def test_2_tensors_on_the_meta_device_are_still_flattened():
    """Every meta tensor reports storage address 0: the sharing check above must not take
    them for tensors over one storage."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to("meta")
    ema = bk.EMA(model, decay=0.5)
    assert ema.launches_per_step == 1
    assert "flat buffer, 4 tensors" in ema.memory_report()


# --- 3. the warm-up schedule -------------------------------------------------------------


def _warmup(t, decay, gamma, power, min_decay):
    """docs/methods.md: 1 - (1 + t / gamma)^(-power), clamped to [min_decay, decay]."""
    return min(max(1.0 - (1.0 + t / gamma) ** -power, min_decay), decay)


# (t, gamma, power, min_decay, decay) -> decay_at(t), each checkable by hand
WARMUP_VALUES = [
    ((2, 2.0, 1.0, 0.0, 0.99), 0.5),  # 1 - 1/2
    ((6, 2.0, 1.0, 0.0, 0.99), 0.75),  # 1 - 1/4
    ((1, 0.5, 1.0, 0.0, 0.99), 2 / 3),  # 1 - 1/3: gamma below 1
    ((4, 4.0, 2.0, 0.0, 0.99), 0.75),  # 1 - 2^-2
    ((24, 3.0, 0.5, 0.0, 0.99), 2 / 3),  # 1 - 9^-1/2
    ((6, 2.0, 1.0, 0.0, 0.7), 0.7),  # 0.75 clamped down to decay
    ((2, 2.0, 1.0, 0.6, 0.99), 0.6),  # 0.5 clamped up to min_decay
    ((0, 10.0, 0.75, 0.25, 0.99), 0.25),  # t = 0: raw 0, so min_decay
]


@pytest.mark.parametrize("args, expected", WARMUP_VALUES)
def test_3_warmup_decay_at_gamma_other_than_one(args, expected):
    """Kills ``t * gamma`` for ``t / gamma`` (the older value test used gamma = 1, where
    the two agree)."""
    t, gamma, power, min_decay, decay = args
    schedule = schedules.Warmup(decay=decay, gamma=gamma, power=power, min_decay=min_decay)
    assert schedule.decay_at(t) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_3_an_ema_with_warmup_gamma_10_follows_a_float64_oracle(backend):
    g = _generator(31)
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    settings = dict(decay=0.995, gamma=10.0, power=0.75, min_decay=0.05)
    ema = bk.EMA(model, decay=schedules.Warmup(**settings), backend=backend)
    names = ema.names()
    params = dict(model.named_parameters())
    oracle = {n: params[n].detach().double().clone() for n in names}
    for t in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        decay = _warmup(t, **settings)
        for n in names:
            oracle[n] += (1 - decay) * (params[n].detach().double() - oracle[n])
        ema.step()
        for n, s in zip(names, ema.shadow_params()):
            assert_close(s, oracle[n], f"shadow {n} after step {t}")


# --- 4. num_skipped survives a checkpoint, for every averager ----------------------------

AVERAGER_CLASSES = {
    "EMA": lambda m, d: bk.EMA(m, decay=0.9),
    "SWA": lambda m, d: bk.SWA(m, start=0),
    "Belay": lambda m, d: bk.Belay(m, alpha=0.2, beta=0.1),
    "TwoPoint": lambda m, d: bk.TwoPoint(m, gap=3),
    "PowerEMA": lambda m, d: bk.PowerEMA(m, sigma_rel=0.1),
    "PostHocEMA": lambda m, d: bk.PostHocEMA(
        m, sigma_rels=(0.05, 0.1), snapshot_every=1000, snapshot_dir=d
    ),
}


def _fresh_model(g):
    model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


# step -> (parameter, flat index, value) written before that step; None: the bad value
# is replaced by a finite one (Belay's spring keeps a NaN weight NaN, so it must be healed)
POISON = {
    1: [("0.weight", 4, float("nan")), ("1.bias", 2, float("nan"))],
    3: [("0.weight", 4, None), ("1.bias", 2, None), ("0.bias", 0, float("inf"))],
    4: [("0.bias", 0, None)],
}


@pytest.mark.parametrize("method", list(AVERAGER_CLASSES))
def test_4_num_skipped_is_restored_by_load_state_dict(method, tmp_path):
    """Kills ``load_state_dict`` leaving the fresh averager's count at 0."""
    make = AVERAGER_CLASSES[method]
    g = _generator(41)
    model = _fresh_model(g)
    averager = make(model, tmp_path / "a")
    params = dict(model.named_parameters())
    expected = 0  # counted here: the non-finite weights each update is shown
    # PostHocEMA counts a kept element once per profile it is kept out of (ops.py's
    # multi_ema_update_: K per non-finite weight)
    profiles = 2 if method == "PostHocEMA" else 1
    for t in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            for name, index, value in POISON.get(t, []):
                flat = params[name].view(-1)
                flat[index] = torch.randn((), generator=g) if value is None else value
        if method != "TwoPoint":  # the others update on every step, and skip
            bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
            expected += profiles * bad
        averager.step()
    state = averager.state_dict()
    if method == "TwoPoint":
        # TwoPoint never skips (its snapshot is a copy), so only a saved count can show
        # whether it is restored: one such as another averager's run leaves
        assert averager.num_skipped == 0
        state["num_skipped"] = expected = 3
    else:
        assert expected == 5 * profiles  # 2 NaN at steps 1 and 2, 1 inf at step 3
        assert averager.num_skipped == expected
    state = torch.load(_saved(state), weights_only=True)  # a real checkpoint's round trip
    twin_model = _fresh_model(_generator(42))
    twin = make(twin_model, tmp_path / "b")
    assert twin.num_skipped == 0
    twin.load_state_dict(state)
    assert twin.num_skipped == expected
    assert twin.state_dict()["num_skipped"] == expected
    # and it keeps counting from there
    with torch.no_grad():
        twin_model[1].weight.view(-1)[7] = float("nan")
    twin.step()
    assert twin.num_skipped == expected + (0 if method == "TwoPoint" else profiles)


def _saved(state) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# --- 5. Belay's floating buffers: an EMA with decay 1 - alpha, never pulled ----------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_5_belay_averages_running_statistics_by_an_ema_and_does_not_pull_them(backend):
    """Kills the buffers' EMA taking ``decay = alpha`` (or any decay but ``1 - alpha``), and
    the spring acting on the buffers: both are checked against a float64 oracle over
    several steps, in which a train-mode forward moves BatchNorm's running statistics."""
    g = _generator(51)
    model = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    alpha, beta = 0.2, 0.35  # 1 - alpha != alpha, and beta moves the parameters visibly
    belay = bk.Belay(model, alpha=alpha, beta=beta, backend=backend)
    names = belay.names()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    buffers = {n for n, b in model.named_buffers() if b.is_floating_point()}
    assert buffers == {"1.running_mean", "1.running_var"} and buffers <= set(names)
    oracle = {n: tensors[n].detach().double().clone() for n in names}
    model.train()
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():  # the optimizer's step
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            # a batch with its own mean and spread each step: the statistics move
            model(torch.randn(16, 6, generator=g) * (1 + t) + t)
        before = {n: tensors[n].detach().clone() for n in names}
        belay.step()
        for n in names:
            w, s = before[n].double(), oracle[n]
            if n in buffers:
                assert torch.equal(tensors[n], before[n]), f"buffer {n} was pulled at step {t}"
            else:
                assert_close(tensors[n].detach(), w + beta * (s - w), f"weights {n} step {t}")
            oracle[n] = s + alpha * (w - s)
        shadows = dict(zip(names, belay.shadow_params()))
        for n in names:
            assert_close(shadows[n], oracle[n], f"shadow {n} after step {t}")
    # the statistics did move, and the shadow follows them at alpha's pace, not at once
    for n in buffers:
        assert not torch.allclose(shadows[n], tensors[n], rtol=1e-3, atol=1e-3)


# --- 6. a snapshot of another kind or format is refused ----------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("format", snapshots.FORMAT + 1), ("kind", "belay_kernels.posthoc snapshot v0")],
)
def test_6_a_snapshot_of_another_format_is_refused_naming_the_file(tmp_path, field, value):
    """Kills ``read_snapshot`` without its format check (or its kind check): a real
    snapshot file, re-saved with one header field changed, must be refused by
    ``read_snapshot`` and by ``reconstruct`` with a BelayInputError naming that file."""
    g = _generator(61)
    model = _fresh_model(g)
    run = tmp_path / "run"
    ema = bk.PostHocEMA(model, sigma_rels=(0.05, 0.1), snapshot_every=2, snapshot_dir=run)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.step()
    ema.wait()
    files = posthoc.snapshot_files(run)
    assert len(files) == 3
    # the control: the folder as written reconstructs
    assert set(posthoc.reconstruct(run, sigma_rel=0.07)) == set(ema.names())
    other = tmp_path / "other"
    shutil.copytree(run, other)
    changed = other / files[1].name
    payload = torch.load(changed, weights_only=True)
    assert payload[field] != value
    payload[field] = value
    torch.save(payload, changed)
    named = re.escape(repr(str(changed)))
    with pytest.raises(BelayInputError, match=named):
        posthoc.read_snapshot(changed)
    with pytest.raises(BelayInputError, match=named):
        posthoc.read_snapshot(changed, mmap=True)
    with pytest.raises(BelayInputError, match=named):
        posthoc.reconstruct(other, sigma_rel=0.07)
    # the unchanged files next to it still read
    posthoc.read_snapshot(other / files[0].name)


# --- 7. num_skipped under a sharded shadow: restored once, not on every rank ---------------


def _poison_and_step(averager, tensors, steps, g) -> int:
    """``steps`` steps of small moves; before every other one, a NaN in each of ``tensors``
    (the whole replicated weights, or this rank's FSDP2 shards), healed the step after.
    Returns how many NaN weights the updates were shown here."""
    shown = 0
    for t in range(steps):
        with torch.no_grad():
            for x in tensors:
                x.add_(torch.randn(x.shape, generator=g) * 0.01)
                if t % 2 == 0 and x.numel():
                    x.view(-1)[(3 * t + 1) % x.numel()] = float("nan")
                    shown += 1
                else:
                    x.nan_to_num_(0.5)
        averager.step()
    return shown


def _global(count: int) -> int:
    total = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def _check_restored_once(make, model, fresh_model, tensors, replicated, what):
    g = _generator(70)  # the same on every rank: a replicated model stays replicated
    averager = make(model)
    shown = _poison_and_step(averager, tensors(model), 4, g)
    # Replicated weights: each NaN lies in one rank's chunk of the shadow and is counted
    # there once. FSDP2: each rank's NaN are in its own shards.
    expected = shown if replicated else _global(shown)
    state = averager.state_dict()  # a collective: num_skipped is the sum over the ranks
    saved = state["num_skipped"]
    assert saved == _global(averager.num_skipped) == expected > 0, what
    twin = make(fresh_model)
    assert twin.num_skipped == 0
    twin.load_state_dict(state)
    assert _global(twin.num_skipped) == saved, f"{what}: restored on every rank?"
    assert twin.state_dict()["num_skipped"] == saved, what
    return saved


def check_sharded_num_skipped(rank, world):
    """DDP with ``shard_shadow=True``: the model is replicated and each rank's shadow holds
    its dim-0 chunk of every parameter; NaN rows in both ranks' chunks."""
    results = {}

    def whole(model):
        return [p.data for p in model.parameters() if p.requires_grad]

    for key, make in {
        "EMA": lambda m: bk.EMA(m, decay=0.9, shard_shadow=True),
        "SWA": lambda m: bk.SWA(m, start=0, shard_shadow=True),
    }.items():
        results[f"ddp {key}"] = _check_restored_once(
            make, tiny(), tiny(seed=3), whole, True, f"sharded DDP {key}"
        )

    def shards(model):  # this rank's local shards (views of FSDP2's sharded memory)
        return [local(p) for p in model.parameters() if p.requires_grad]

    for key, make in {
        "EMA": lambda m: bk.EMA(m, decay=0.9),
        "SWA": lambda m: bk.SWA(m, start=0),
        "Belay": lambda m: bk.Belay(m, alpha=0.2, beta=0.1),
    }.items():
        results[f"fsdp2 {key}"] = _check_restored_once(
            make, tiny(shard=True), tiny(seed=3, shard=True), shards, False, f"FSDP2 {key}"
        )
    return results


def test_7_num_skipped_under_a_sharded_shadow_is_restored_once_not_on_every_rank():
    """Kills ``load_state_dict`` filling the saved (global) count on every rank: the sum
    over the ranks, which state_dict() saves again, would double on 2 ranks."""
    results = run_ranks(check_sharded_num_skipped, 2, timeout=150)
    assert results[0] == results[1]  # every rank saw the same global counts
