"""The bad-input promise, case by case: a refused call raises BelayInputError with a clear
message and leaves every tensor bit for bit as it was, at the op and at the averager level;
an out-of-range hyperparameter held in a tensor is guarded on the device; a weight of
exactly 1 copies; NaN results have the same bits on the flat and the list path.

Each test below reproduces one case of issue 17 (numbered as there) or kills one mutation
that the older tests let through.
"""

import pytest
import torch
from _untouched import Snapshot, bits, cpu_backends
from torch import nn

import belay_kernels as bk
from belay_kernels import BelayInputError, ops, reference, schedules

BACKENDS = cpu_backends()
needs_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")


def fresh(n=17, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


# --- 1. written, then raised ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_an_expanded_output_is_refused_before_anything_is_written(backend):
    w = fresh(4)
    expanded = torch.tensor([9.0]).expand(4)
    snap = Snapshot(w, expanded)
    with pytest.raises(
        BelayInputError,
        match=r"shadow \(shape \(4,\), strides \(0,\)\) has elements that share memory",
    ):
        ops.swap_(w, expanded, backend=backend)
    snap.assert_unchanged()

    s = fresh(1, seed=1).expand(4)
    skipped = torch.zeros((), dtype=torch.int64)
    snap = Snapshot(w, s, skipped)
    with pytest.raises(BelayInputError, match="shadow .* has elements that share memory"):
        ops.belay_step_(w, s, alpha=0.5, beta=0.5, skipped=skipped, backend=backend)
    with pytest.raises(BelayInputError, match="shadow .* has elements that share memory"):
        ops.ema_update_(s, w, decay=0.5, skipped=skipped, backend=backend)
    snap.assert_unchanged()


def test_1_a_self_overlapping_layout_is_refused_an_ordinary_one_is_not():
    base = fresh(8)
    folded = base.as_strided((3, 3), (2, 1))  # rows overlap: element (0, 2) is (1, 0)
    w = fresh(9, seed=1).view(3, 3)
    snap = Snapshot(base, w)
    with pytest.raises(BelayInputError, match=r"shadow \(shape \(3, 3\), strides \(2, 1\)\)"):
        ops.ema_update_(folded, w, decay=0.5, backend="torch")
    snap.assert_unchanged()
    # transposed, sliced and permuted layouts give every element its own memory
    ok = fresh(24, seed=2).view(2, 3, 4).permute(2, 0, 1)[::2]
    ops.ema_update_(ok, fresh(12, seed=3).view(2, 2, 3), decay=0.5, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_a_bad_late_row_leaves_the_earlier_rows_and_the_counter_untouched(backend):
    shadows = [fresh(5, seed=i) for i in range(2)] + [fresh(1, seed=2).expand(5)]
    weights = [fresh(5, seed=10 + i) for i in range(3)]
    skipped = torch.zeros((), dtype=torch.int64)
    snap = Snapshot(shadows, weights, skipped)
    with pytest.raises(BelayInputError, match=r"shadow\[2\] .* has elements that share memory"):
        ops.ema_update_(shadows, weights, decay=0.5, skipped=skipped, backend=backend)
    with pytest.raises(BelayInputError, match=r"shadow\[2\] .* has elements that share memory"):
        ops.belay_step_(weights, shadows, alpha=0.5, beta=0.5, backend=backend)
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "hparams, message",
    [
        (
            dict(alpha=torch.tensor([[0.5]]), beta=0.5),
            r"alpha as a tensor must hold one floating-point value, shape \(\) or \(1,\), got shape \(1, 1\)",
        ),
        (dict(alpha=0.5, beta=torch.tensor([0.5, 0.5])), r"beta as a tensor .* got shape \(2,\)"),
        (dict(alpha=torch.tensor(1), beta=0.5), r"alpha as a tensor .* dtype torch.int64"),
    ],
)
def test_1_a_malformed_tensor_hyperparameter_is_refused_by_every_backend(backend, hparams, message):
    w, s = fresh(6), fresh(6, seed=1)
    snap = Snapshot(w, s)
    with pytest.raises(BelayInputError, match=message):
        ops.belay_step_(w, s, **hparams, backend=backend)
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_1_malformed_counts_are_refused(backend):
    s, w = fresh(6), fresh(6, seed=1)
    snap = Snapshot(s, w)
    for count, message in [
        (
            torch.tensor([[1]]),
            r"count as a tensor must hold one integer value, shape \(\) or \(1,\), got shape \(1, 1\)",
        ),
        (torch.tensor(1.0), r"count as a tensor .* dtype torch.float32"),
        (torch.tensor(True), r"count as a tensor .* dtype torch.bool"),
    ]:
        with pytest.raises(BelayInputError, match=message):
            ops.swa_update_(s, w, count=count, backend=backend)
    snap.assert_unchanged()


# --- 2. an averager half-updated -------------------------------------------------------------


def _double_then_float():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3).double(), nn.Linear(3, 3))


@needs_cpp
@pytest.mark.parametrize(
    "make",
    [
        lambda m: bk.EMA(m, decay=0.5, shadow_dtype=torch.float64, backend="cpp"),
        lambda m: bk.Belay(m, alpha=0.5, beta=0.5, shadow_dtype=torch.float64, backend="cpp"),
    ],
)
def test_2_the_constructor_refuses_a_backend_that_step_could_not_run(make):
    model = _double_then_float()
    addresses = [p.data_ptr() for p in model.parameters()]
    snap = Snapshot(list(model.parameters()))
    with pytest.raises(
        BelayInputError,
        match=r"step\(\) could not run on the track of 1.weight, 1.bias \(torch.float32 weights, "
        r"torch.float64 shadow, on cpu\): backend 'cpp' cannot run \w+ on cpu tensors of dtype",
    ):
        make(model)
    snap.assert_unchanged()
    assert [p.data_ptr() for p in model.parameters()] == addresses, "nothing may be moved either"


def _flat_and_leftover():
    """A flat track (the Linear) first, then a tensor-list track: a parameter that is a view
    into a larger storage stays where it is."""
    torch.manual_seed(1)
    model = nn.Module()
    model.lin = nn.Linear(4, 4)
    model.odd = nn.Parameter(torch.randn(20)[:12].view(3, 4))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda m, b: bk.EMA(m, decay=0.5, backend=b),
        lambda m, b: bk.SWA(m, backend=b),
        lambda m, b: bk.Belay(m, alpha=0.3, beta=0.4, backend=b),
        lambda m, b: bk.TwoPoint(m, gap=1, backend=b),
    ],
    ids=["EMA", "SWA", "Belay", "TwoPoint"],
)
def test_2_a_failing_step_leaves_every_track_counter_and_weight_as_it_was(backend, make):
    model = _flat_and_leftover()
    averager = make(model, backend)
    averager.step()
    assert averager.launches_per_step == 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # so that the next step would change every track
    # the list track's tensor is replaced by one of another shape: its check fails, after
    # the flat track's has passed
    model.odd.data = torch.randn(5)
    snap = Snapshot(
        list(model.parameters()), averager.shadow_params(), list(averager._skipped.values())
    )
    counters = (averager.num_steps, averager.num_updates, averager.num_skipped)
    with pytest.raises(
        BelayInputError, match=r"\[0\] has shape \((5,|3, 4)\) but \w+\[0\] has shape \((3, 4|5,)\)"
    ):
        averager.step()
    snap.assert_unchanged()
    assert (averager.num_steps, averager.num_updates, averager.num_skipped) == counters


# --- 3. aliasing across the rows of a list ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_3_aliasing_across_rows_is_refused(backend):
    a, b, w1, s1, s2 = (fresh(7, seed=i) for i in range(5))
    snap = Snapshot(a, b, w1, s1, s2)
    with pytest.raises(BelayInputError, match=r"shadow\[0\] and weights\[1\] share memory"):
        ops.ema_update_([a, b], [w1, a], decay=0.5, backend=backend)
    with pytest.raises(BelayInputError, match=r"weights\[0\] and weights\[1\] share memory"):
        ops.belay_step_([a, a], [s1, s2], alpha=0.5, beta=0.5, backend=backend)
    with pytest.raises(BelayInputError, match=r"weights\[0\] and shadow\[1\] share memory"):
        ops.swap_([a, b], [s1, a], backend=backend)
    snap.assert_unchanged()
    # reading one tensor in two rows is fine
    ops.ema_update_([s1, s2], [w1, w1], decay=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3_partial_overlap_by_one_element_and_a_one_element_tensor_twice(backend):
    """Kills ``_checks._byte_span`` ending one element early."""
    buf = fresh(33)
    x = fresh(1, seed=1)
    snap = Snapshot(buf, x)
    with pytest.raises(BelayInputError, match="shadow and weights share memory"):
        ops.ema_update_(buf[0:17], buf[16:33], decay=0.5, backend=backend)
    with pytest.raises(BelayInputError, match="shadow and weights share memory"):
        ops.ema_update_(x, x, decay=0.5, backend=backend)
    with pytest.raises(BelayInputError, match=r"shadow\[0\] and shadow\[1\] share memory"):
        ops.ema_update_([buf[0:17], buf[16:20]], [fresh(17), fresh(4)], decay=0.5, backend=backend)
    snap.assert_unchanged()


# --- 4. tensor hyperparameters, guarded on the device ----------------------------------------

BAD_TENSOR_HPARAMS = [
    ("ema", dict(decay=torch.tensor(float("nan"), dtype=torch.float64))),
    ("ema", dict(decay=torch.tensor([1.5]))),
    ("ema", dict(decay=torch.tensor(-0.25, dtype=torch.float64))),
    ("swa", dict(count=torch.tensor(-1))),
    ("swa", dict(count=torch.tensor([-7], dtype=torch.int32))),
    ("belay", dict(alpha=torch.tensor(float("nan")), beta=0.5)),
    ("belay", dict(alpha=0.5, beta=torch.tensor(1.5, dtype=torch.float64))),
]


def _call(method, w, s, **kwargs):
    if method == "ema":
        ops.ema_update_(s, w, **kwargs)
    elif method == "swa":
        ops.swa_update_(s, w, **kwargs)
    else:
        ops.belay_step_(w, s, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("method, hparams", BAD_TENSOR_HPARAMS)
@pytest.mark.parametrize("lists", [False, True], ids=["flat", "list"])
def test_4_an_out_of_range_tensor_hyperparameter_writes_nothing_and_counts_skipped(
    backend, nonfinite, method, hparams, lists
):
    sizes = (1000, 3) if lists else (1003,)
    w = [fresh(n, seed=i) for i, n in enumerate(sizes)]
    s = [fresh(n, seed=10 + i) for i, n in enumerate(sizes)]
    if not lists:
        w, s = w[0], s[0]
    skipped = torch.zeros((), dtype=torch.int64)
    snap = Snapshot(w, s)
    _call(method, w, s, **hparams, nonfinite=nonfinite, skipped=skipped, backend=backend)
    snap.assert_unchanged()
    assert skipped.item() == 1003


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("method, hparams", BAD_TENSOR_HPARAMS)
def test_4_an_out_of_range_tensor_hyperparameter_keeps_nan_payloads(backend, method, hparams):
    """Written nothing means every bit stays, even a NaN with a sign and a payload that a
    store through fp32 would make canonical."""
    w, s = fresh(1003, torch.bfloat16), fresh(1003, torch.bfloat16, seed=1)
    w.view(torch.int16)[::7] = -1  # 0xffff
    s.view(torch.int16)[3::11] = 0x7F81  # a signalling-pattern NaN
    snap = Snapshot(w, s)
    _call(method, w, s, **hparams, nonfinite="propagate", backend=backend)
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_4_a_valid_tensor_hyperparameter_gives_what_the_number_gives(backend):
    w, s = fresh(101), fresh(101, seed=1)
    for method, tensor_kwargs, number_kwargs in [
        ("ema", dict(decay=torch.tensor(0.75, dtype=torch.float64)), dict(decay=0.75)),
        ("swa", dict(count=torch.tensor([3])), dict(count=3)),
        (
            "belay",
            dict(alpha=torch.tensor(0.25), beta=torch.tensor([0.5], dtype=torch.float64)),
            dict(alpha=0.25, beta=0.5),
        ),
    ]:
        w1, s1, w2, s2 = w.clone(), s.clone(), w.clone(), s.clone()
        _call(method, w1, s1, **tensor_kwargs, backend=backend)
        _call(method, w2, s2, **number_kwargs, backend=backend)
        assert torch.equal(bits(w1), bits(w2)) and torch.equal(bits(s1), bits(s2)), method


# --- 5. messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_5_huge_and_out_of_range_python_numbers_get_a_clear_message(backend):
    s, w = fresh(), fresh(seed=1)
    snap = Snapshot(s, w)
    with pytest.raises(
        BelayInputError, match=r"count is how many models .* in \[0, 2\*\*63 - 2\], got 10{30}"
    ):
        ops.swa_update_(s, w, count=10**30, backend=backend)
    with pytest.raises(BelayInputError, match=r"got 9223372036854775807"):
        ops.swa_update_(s, w, count=2**63 - 1, backend=backend)
    with pytest.raises(BelayInputError, match=r"decay must be in \[0, 1\], got 10{30}"):
        ops.ema_update_(s, w, decay=10**30, backend=backend)
    with pytest.raises(BelayInputError, match=r"alpha must be in \[0, 1\], got -1"):
        ops.belay_step_(w, s, alpha=-1, beta=1, backend=backend)
    snap.assert_unchanged()
    ops.swa_update_(s, w, count=2**63 - 2, backend=backend)  # the largest count still runs


def test_5_the_backend_name_is_checked_even_for_empty_lists():
    with pytest.raises(BelayInputError, match="backend must be 'auto' or one of"):
        ops.ema_update_([], [], decay=0.5, backend="bogus")
    with pytest.raises(BelayInputError, match="backend must be 'auto' or one of"):
        ops.swap_([], [], backend="bogus")
    ops.ema_update_([], [], decay=0.5, backend="torch")


@needs_cpp
def test_5_mixed_layouts_are_all_resolved_before_any_runs():
    """Kills ``plan.launches`` resolving each group's backend only when it runs it: the
    contiguous group would be updated by cpp before the non-contiguous one is refused."""
    s_ok, w_ok = fresh(8), fresh(8, seed=1)
    s_odd, w_odd = fresh(12, seed=2).view(3, 4).t(), fresh(12, seed=3).view(4, 3)
    snap = Snapshot(s_ok, w_ok, s_odd, w_odd)
    with pytest.raises(
        BelayInputError, match="backend 'cpp' cannot run ema_update_ on non-contiguous cpu tensors"
    ):
        ops.ema_update_([s_ok, s_odd], [w_ok, w_odd], decay=0.5, backend="cpp")
    snap.assert_unchanged()


# --- 6. a rate of exactly 1 copies, even over a non-finite shadow ---------------------------

NONFINITE = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, float("nan")])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "pair",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_6_a_weight_of_one_copies_over_a_nonfinite_shadow(backend, pair, as_tensor):
    w_dtype, s_dtype = pair
    w = torch.tensor([2.0, 3.0, 4.0, -5.0, 0.5]).to(w_dtype)
    expected = w.to(s_dtype)

    def value(x, dtype=torch.float64):
        return torch.tensor(x, dtype=dtype) if as_tensor else x

    for nonfinite in ("skip", "propagate"):
        s = NONFINITE.to(s_dtype)
        ops.ema_update_(s, w, decay=value(0.0), nonfinite=nonfinite, backend=backend)
        assert torch.equal(s, expected), f"EMA decay 0 ({nonfinite}): {s}"
        s = NONFINITE.to(s_dtype)
        ops.swa_update_(s, w, count=value(0, torch.int64), nonfinite=nonfinite, backend=backend)
        assert torch.equal(s, expected), f"SWA count 0 ({nonfinite}): {s}"
        s = NONFINITE.to(s_dtype)
        w2 = w.clone()
        ops.belay_step_(
            w2, s, alpha=value(1.0), beta=value(0.0), nonfinite=nonfinite, backend=backend
        )
        assert torch.equal(s, expected), f"Belay alpha 1 ({nonfinite}): {s}"
    # beta 1: the model takes the shadow exactly, whatever the model held
    s = w.to(s_dtype) * 3
    expected = s.to(w_dtype, copy=True)
    w2 = NONFINITE.to(w_dtype)
    ops.belay_step_(
        w2, s, alpha=value(0.5), beta=value(1.0), nonfinite="propagate", backend=backend
    )
    assert torch.equal(w2, expected), f"Belay beta 1: {w2}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_6_the_first_swa_update_and_a_zero_decay_copy_at_the_averager_level(backend):
    for make in (
        lambda m: bk.SWA(m, nonfinite="propagate", backend=backend),
        lambda m: bk.EMA(m, decay=0.0, nonfinite="propagate", backend=backend),
    ):
        model = nn.Linear(3, 2)
        averager = make(model)
        for s in averager.shadow_params():
            s.fill_(float("nan"))
        averager.step()
        for s, p in zip(averager.shadow_params(), model.parameters()):
            assert torch.equal(s, p.detach())


# --- 7. NaN bits: the flat and the list path agree ---------------------------------------------


def _nan_model(w_dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 7)).to(w_dtype)
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w[::37] = float("nan")
        w.view(torch.int16)[5::41] = -1  # 0xffff: a NaN with sign and payload
        model[1].bias[3] = float("inf")
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "w_dtype, s_dtype",
    [
        (torch.bfloat16, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("method", ["Belay", "EMA", "TwoPoint"])
def test_7_nan_results_have_the_same_bits_on_the_flat_and_the_list_path(
    backend, w_dtype, s_dtype, method
):
    if backend == "cpp" and s_dtype == torch.float64:
        pytest.skip("cpp has no bf16/fp64 kernel")
    results = []
    for flatten in (True, False):
        model = _nan_model(w_dtype)
        if method == "Belay":
            averager = bk.Belay(
                model,
                alpha=0.25,
                beta=0.5,
                shadow_dtype=s_dtype,
                nonfinite="propagate",
                backend=backend,
                flatten=flatten,
            )
        elif method == "EMA":
            averager = bk.EMA(
                model,
                decay=0.5,
                shadow_dtype=s_dtype,
                nonfinite="propagate",
                backend=backend,
                flatten=flatten,
            )
        else:
            averager = bk.TwoPoint(model, gap=2, backend=backend, flatten=flatten)
        with torch.no_grad():
            for s in averager.shadow_params():
                s.view(-1)[1::23] = float("nan")
        for _ in range(2):
            averager.step()
        averaged = averager._averaged_values()
        results.append([bits(t) for t in list(model.parameters()) + averaged])
    for flat, listed in zip(*results):
        assert torch.equal(flat, listed)


def test_7_the_reference_stores_the_canonical_nan_into_16_bit_dtypes():
    big = torch.full((4099,), float("nan"), dtype=torch.float64)
    big[::2] = -big[::2]
    for dtype, canonical in ((torch.bfloat16, 0x7FC0), (torch.float16, 0x7E00)):
        out = torch.empty(4099, dtype=dtype)
        reference.two_point_average_(out, big.to(dtype), big)
        assert (out.view(torch.int16) == canonical).all()


# --- the mutations the older tests let through ---------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: bk.EMA(m, decay=0.9),
        lambda m: bk.SWA(m, start=1),
        lambda m: bk.Belay(m, alpha=0.2, beta=0.1),
        lambda m: bk.TwoPoint(m, gap=3),
    ],
    ids=["EMA", "SWA", "Belay", "TwoPoint"],
)
def test_resuming_restores_every_counter(make):
    """Kills load_state_dict forgetting num_skipped, and TwoPoint's forgetting snapshot_step."""
    torch.manual_seed(4)
    model = nn.Linear(5, 3)
    averager = make(model)
    for t in range(4):
        with torch.no_grad():
            model.weight.add_(0.1)
            if t == 1:
                model.bias[0] = float("nan")
            if t == 2:
                model.bias[0] = 0.5
        averager.step()
    state = averager.state_dict()
    twin = make(nn.Linear(5, 3))
    twin.load_state_dict(state)
    for name in ("num_steps", "num_updates", "num_skipped"):
        assert getattr(twin, name) == getattr(averager, name), name
    if isinstance(averager, bk.TwoPoint):
        assert averager.snapshot_age == 1 and twin.snapshot_age == 1
    else:
        assert averager.num_skipped >= 1  # a counter that a fresh averager would not have


def test_parameters_that_are_views_of_one_storage_stay_views():
    """Kills flat.can_flatten without its storage-ownership check."""
    base = torch.randn(10)
    module = nn.Module()
    module.a = nn.Parameter(base[:4])
    module.b = nn.Parameter(base[4:])
    ema = bk.EMA(module, decay=0.5)
    a_before = base[:4].clone()
    with torch.no_grad():
        base.add_(1.0)  # a write to the shared storage must still reach both parameters
    assert torch.equal(module.a, base[:4]) and torch.equal(module.b, base[4:])
    ema.step()
    assert torch.equal(ema.shadow_params()[0], torch.lerp(a_before, base[:4], 0.5))


def test_warmup_follows_its_formula_for_gamma_other_than_one():
    """Kills ``t * gamma`` for ``t / gamma`` (the older tests only used gamma = 1)."""
    warm = schedules.Warmup(decay=0.999, gamma=4.0, power=0.5, min_decay=0.0)
    for t in (0, 1, 3, 10, 100):
        assert warm.decay_at(t) == pytest.approx(min(1 - (1 + t / 4.0) ** -0.5, 0.999), abs=1e-15)
    assert warm.decay_at(12) == pytest.approx(0.5, abs=1e-15)  # (1 + 12/4)^-0.5 = 1/2


def test_belay_averages_batchnorm_buffers_with_decay_one_minus_alpha():
    """Kills the buffer EMA taking ``decay = alpha``: a forward pass in train mode moves
    the running statistics, and the shadow of each must follow them with weight alpha."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    alpha = 0.2
    belay = bk.Belay(model, alpha=alpha, beta=0.1)
    names = belay.names()
    shadow_before = {n: s.clone() for n, s in zip(names, belay.shadow_params())}
    model.train()
    model(torch.randn(16, 4) * 3 + 1)
    belay.step()
    buffers = dict(model.named_buffers())
    checked = 0
    for name, shadow in zip(names, belay.shadow_params()):
        if name in buffers and buffers[name].is_floating_point():
            assert not torch.equal(buffers[name], shadow_before[name]), (
                "the forward pass must move it"
            )
            expected = torch.lerp(shadow_before[name], buffers[name], alpha)
            torch.testing.assert_close(shadow, expected, atol=0, rtol=2**-22)
            checked += 1
    assert checked == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, big", [(torch.float16, 60000.0), (torch.float16, -65504.0)])
def test_the_two_point_average_does_not_overflow_when_the_sum_would(backend, dtype, big):
    """Kills the average summing in the storage dtype instead of opmath (bf16 has fp32's
    range: where its sum overflows, fp32's does too)."""
    w = torch.full((37,), big, dtype=dtype)
    snap = w.clone()
    snap[::2] = -big
    out = ops.two_point_average(w, snap, backend=backend)
    expected = torch.where(torch.arange(37) % 2 == 0, 0.0, w.double()).to(dtype)
    assert torch.equal(out, expected)
    assert torch.isfinite(out).all()
