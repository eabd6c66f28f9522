"""What only the Triton backend has, run in Triton's interpreter on CPU tensors: the
device-side step gate and warmup, out-of-range device hyperparameters, pointer tables and
per-tensor alignment, scalars by value, and the K-profile EMA's own kernels and refusals.
Every method against the reference on "triton" is in tests/test_backends.py.

Not collected directly (no ``test_`` prefix): TRITON_INTERPRET=1 must be set before
Triton is imported, so tests/test_triton_interpreter.py runs this file in a subprocess
with that variable, leaving the rest of the test session untouched. To run it alone:

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest tests/triton_interpreter_cases.py
"""

import os
import zlib

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

import _triton_interpreter  # noqa: E402
from _backend_cases import pair_id  # noqa: E402

from belay_kernels import backends, ops, reference  # noqa: E402
from belay_kernels.backend.triton import StepGate, advance_step_  # noqa: E402
from belay_kernels.backend.triton import belay as triton_belay  # noqa: E402
from belay_kernels.backend.triton import ema as triton_ema  # noqa: E402
from belay_kernels.backend.triton import swa as triton_swa  # noqa: E402
from belay_kernels.schedules import Warmup  # noqa: E402
from belay_kernels.testing import (  # noqa: E402
    DTYPE_PAIRS,
    assert_close,
    random_like_model,
)

_triton_interpreter.round_bf16_like_the_gpu()

# NaN/inf inputs (the non-finite policy's test data) make numpy warn inside the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

STEPS = 3
ALPHA, BETA = 0.3, 0.6
LIST_SIZES = (1, 3, 0, 1009, 8197)  # 8197 spans more than two blocks of every dtype


def fresh(n, dtype, gen, nonfinite=False):
    t = random_like_model(n, dtype, generator=gen)
    if nonfinite and n >= 3:
        positions = torch.randperm(n, generator=gen)[: max(3, n // 100)]
        t[positions[0::3]] = float("nan")
        t[positions[1::3]] = float("inf")
        t[positions[2::3]] = -float("inf")
    return t


OPS = {"ema": ops.ema_update_, "swa": ops.swa_update_, "belay": ops.belay_step_}


def test_registry_offers_triton_on_cpu_under_the_interpreter():
    assert "cpu" in backends()["triton"]


GATE_START, GATE_EVERY = 1, 2
# The schedule computed on the device from the gate's update number k = 0..3: the first
# rising freely from 0 below its decay, the second held at min_decay (k = 0) and at its
# decay (k = 3).
WARMUPS = {
    "ema-warmup": Warmup(decay=0.9, gamma=1.0, power=0.75),
    "ema-warmup-clamped": Warmup(decay=0.6, gamma=1.0, power=0.75, min_decay=0.3),
}
SKIP_PATTERN = (0, 0, 1, 0, 0, 1, 0, 0, 0)  # found_inf per step


def gated_expectations():
    """(skip, active, k) per step, computed on the host from the gate's definition."""
    t = 0
    for skip in SKIP_PATTERN:
        since = t - GATE_START
        active = not skip and since >= 0 and since % GATE_EVERY == 0
        yield skip, active, since // GATE_EVERY
        t += 0 if skip else 1


@pytest.mark.parametrize("foreach", [False, True], ids=["flat", "list"])
@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[1], DTYPE_PAIRS[4]], ids=pair_id)
@pytest.mark.parametrize("method", ["ema", *WARMUPS, "swa", "belay"])
def test_step_gate_counts_and_skips_on_the_device(method, pair, foreach):
    weights_dtype, shadow_dtype = pair
    gen = torch.Generator().manual_seed(19)
    sizes = LIST_SIZES if foreach else (1009,)
    shadows = [fresh(n, shadow_dtype, gen) for n in sizes]
    weights = [fresh(n, weights_dtype, gen) for n in sizes]
    expected = ([s.clone() for s in shadows], [w.clone() for w in weights])
    found_inf = torch.zeros(1)
    gate = StepGate.on("cpu", skip=found_inf, start=GATE_START, every=GATE_EVERY)
    warmup = WARMUPS.get(method)
    decay = 0.9
    for skip, active, k in gated_expectations():
        found_inf.fill_(float(skip))
        for w, e in zip(weights, expected[1]):
            w.copy_(fresh(w.numel(), w.dtype, gen))
            e.copy_(w)
        s_arg, w_arg = (shadows, weights) if foreach else (shadows[0], weights[0])
        if method.startswith("ema"):
            fn = triton_ema.ema_update_foreach_ if foreach else triton_ema.ema_update_
            fn(s_arg, w_arg, warmup or decay, True, None, gate=gate)
        elif method == "swa":
            fn = triton_swa.swa_update_foreach_ if foreach else triton_swa.swa_update_
            fn(s_arg, w_arg, 0, True, None, gate=gate)
        else:
            fn = triton_belay.belay_step_foreach_ if foreach else triton_belay.belay_step_
            fn(w_arg, s_arg, ALPHA, BETA, True, None, gate=gate)
        advance_step_(gate)
        if active:
            for s, w in zip(*expected):
                if method == "ema":
                    reference.ema_update_(s, w, decay)
                elif method in WARMUPS:
                    reference.ema_update_(s, w, warmup.decay_at(k))
                elif method == "swa":
                    reference.swa_update_(s, w, k)
                else:
                    reference.belay_step_(w, s, ALPHA, BETA)
        for i in range(len(sizes)):
            assert_close(shadows[i], expected[0][i], f"{method} k={k} tensor {i}")
            assert_close(weights[i], expected[1][i], f"{method} k={k} tensor {i}")
    assert int(gate.step) == sum(1 for s in SKIP_PATTERN if not s)


def test_warmup_without_gate_is_refused():
    shadow, weights = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match="StepGate"):
        triton_ema.ema_update_(shadow, weights, Warmup())


def test_measure_counts_bytes_explicitly(monkeypatch):
    """The GPU measurement's bookkeeping (timing replaced: no GPU here)."""
    from belay_kernels.backend.triton import measure

    monkeypatch.setattr(
        measure,
        "time_cuda",
        lambda fn, runs, warmup: (fn(), {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0})[1],
    )
    rows = measure.kernel_bandwidth("cpu", 4099, 1, 0, measure.METHODS, DTYPE_PAIRS)
    assert len(rows) == len(measure.METHODS) * len(DTYPE_PAIRS) - 1  # swap: no fp16/fp32
    ema_mixed = next(
        r
        for r in rows
        if r["kernel"] == "ema_update_"
        and (r["weights_dtype"], r["shadow_dtype"]) == ("bfloat16", "float32")
    )
    assert ema_mixed["bytes_per_element"] == 2 + 4 + 4  # read weights and shadow, write shadow
    assert ema_mixed["gbps"] == 10 * 4099 / 2.0 / 1e6


BAD_TENSOR_HPARAMS = [
    ("ema", dict(decay=torch.tensor(float("nan"), dtype=torch.float64))),
    ("ema", dict(decay=torch.tensor([1.5]))),
    ("swa", dict(count=torch.tensor(-1))),
    ("belay", dict(alpha=torch.tensor(float("nan")), beta=0.5)),
    ("belay", dict(alpha=0.5, beta=torch.tensor(-0.5, dtype=torch.float64))),
]


@pytest.mark.parametrize("method, hparams", BAD_TENSOR_HPARAMS)
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_an_out_of_range_tensor_hyperparameter_writes_nothing_and_counts_skipped(
    method, hparams, nonfinite
):
    gen = torch.Generator().manual_seed(11)
    for sizes in ((1009,), (1, 1009, 3)):
        shadows = [fresh(n, torch.float32, gen) for n in sizes]
        weights = [fresh(n, torch.bfloat16, gen) for n in sizes]
        before = [t.clone() for t in shadows + weights]
        skipped = torch.zeros((), dtype=torch.int64)
        s, w = (shadows[0], weights[0]) if len(sizes) == 1 else (shadows, weights)
        if method == "belay":
            ops.belay_step_(w, s, **hparams, nonfinite=nonfinite, skipped=skipped, backend="triton")
        else:
            OPS[method](s, w, **hparams, nonfinite=nonfinite, skipped=skipped, backend="triton")
        for t, b in zip(shadows + weights, before):
            assert torch.equal(t.view(torch.int16), b.view(torch.int16)), sizes
        assert int(skipped) == sum(sizes)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_a_weight_of_one_copies_over_a_nonfinite_shadow(as_tensor):
    def value(x, dtype=torch.float64):
        return torch.tensor(x, dtype=dtype) if as_tensor else x

    w = torch.tensor([2.0, 3.0, 4.0, -5.0, 0.5]).to(torch.bfloat16)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, float("nan")])
    for nonfinite in ("skip", "propagate"):
        s = bad.clone()
        ops.ema_update_(s, w, decay=value(0.0), nonfinite=nonfinite, backend="triton")
        assert torch.equal(s, w.float())
        s = bad.clone()
        ops.swa_update_(s, w, count=value(0, torch.int64), nonfinite=nonfinite, backend="triton")
        assert torch.equal(s, w.float())
        s, w2 = bad.clone(), w.clone()
        ops.belay_step_(
            w2, s, alpha=value(1.0), beta=value(0.0), nonfinite=nonfinite, backend="triton"
        )
        assert torch.equal(s, w.float())


# --- the GPU-path review (issue 16): swap specials, pointer tables, alignment, scalars -----


@pytest.mark.parametrize("foreach", [False, True], ids=["flat", "list"])
def test_packed_swap_keeps_nan_and_restores_bits(foreach):
    from belay_kernels.testing import check_packed_swap, packed_swap_case

    def swap(w, s, inverse):
        if foreach:  # unaligned pieces of the same words
            cuts = [0, 5, 6, 3000, w.numel()]
            pieces = [(w[a:b], s[a:b]) for a, b in zip(cuts, cuts[1:])]
            ops.swap_(
                [p[0] for p in pieces], [p[1] for p in pieces], inverse=inverse, backend="triton"
            )
        else:
            ops.swap_(w, s, inverse=inverse, backend="triton")

    check_packed_swap(*packed_swap_case(), swap)


def _tables():
    from belay_kernels.backend.triton._launch import PointerTable

    return PointerTable._tables


def _key(*columns):
    return tuple((t.data_ptr(), t.numel(), t.dtype, t.device) for c in columns for t in c)


def test_pointer_tables_live_as_long_as_their_tensors():
    """More list signatures than the old 32-entry cache held: none is evicted while its
    tensors live, a reused list keeps its very table, and a freed list frees its table."""
    import gc

    gen = torch.Generator().manual_seed(23)
    lists = [
        (
            [fresh(3 + i, torch.float32, gen) for _ in range(2)],
            [fresh(3 + i, torch.float32, gen) for _ in range(2)],
        )
        for i in range(40)
    ]
    for pair in lists:
        ops.ema_update_(*pair, decay=0.9, backend="triton")
    del pair
    keys = [_key(*pair) for pair in lists]
    assert all(key in _tables() for key in keys)
    first = _tables()[keys[0]]
    address = first[0].table.data_ptr()
    expected = [s.clone() for s in lists[0][0]]
    ops.ema_update_(lists[0][0], lists[0][1], decay=0.9, backend="triton")
    reference.ema_update_(expected[0], lists[0][1][0], 0.9)
    reference.ema_update_(expected[1], lists[0][1][1], 0.9)
    assert _tables()[keys[0]] is first and first[0].table.data_ptr() == address
    assert_close(lists[0][0][0], expected[0], "after 40 other signatures")
    del lists, expected, first
    gc.collect()
    assert not any(key in _tables() for key in keys)


def test_two_point_lists_without_out_do_not_accumulate_tables():
    import gc

    gen = torch.Generator().manual_seed(29)
    weights = [fresh(n, torch.float32, gen) for n in (5, 17)]
    snapshots = [fresh(n, torch.float32, gen) for n in (5, 17)]
    gc.collect()
    before = set(_tables())
    for _ in range(40):
        ops.two_point_average(weights, snapshots, backend="triton")  # a new `out` each time
    gc.collect()
    assert not set(_tables()) - before


def test_each_tensor_is_aligned_on_its_own():
    """One misaligned tensor no longer turns the whole list scalar: aligned tensors, and
    a tensor misaligned alike in every column after its scalar head, go in the table
    launched with ALIGNED=True; the heads and a tensor whose columns never align (here
    misaligned by 4 bytes in the shadow only) in a second. Results match the reference."""
    from belay_kernels.backend.triton._launch import PointerTable

    gen = torch.Generator().manual_seed(31)
    shadow_storage = [fresh(n + 1, torch.float32, gen) for n in LIST_SIZES]
    weight_storage = [fresh(n + 1, torch.float32, gen) for n in LIST_SIZES]
    # sizes (1, 3, 0, 1009, 8197): tensor 3 misaligned in the shadow only, tensor 4 in both
    shadows = [t[1:] if i in (3, 4) else t[:-1] for i, t in enumerate(shadow_storage)]
    weights = [t[1:] if i == 4 else t[:-1] for i, t in enumerate(weight_storage)]
    tables = PointerTable.of([shadows, weights], [shadows, weights])
    assert [t.aligned for t in tables] == [True, False]
    # aligned: tensors 0 and 1 and the body of 4; misaligned: tensor 3 and the head of 4
    assert [t.num_tensors for t in tables] == [3, 2]
    # the sizes follow the two columns of offsets: tensor 3, then the 3-element head of 4
    assert tables[1].table[4:6].tolist() == [1009, 3]
    expected = [s.clone() for s in shadows]
    ops.ema_update_(shadows, weights, decay=0.7, backend="triton")
    ops.ema_update_(expected, weights, decay=0.7, backend="torch")
    for i, (got, want) in enumerate(zip(shadows, expected)):
        assert_close(got, want, f"tensor {i}")


def test_building_a_table_during_capture_is_refused_before_anything_is_written(monkeypatch):
    from belay_kernels import BelayInputError
    from belay_kernels.backend.triton import _launch

    gen = torch.Generator().manual_seed(37)
    built = (
        [fresh(9, torch.float32, gen) for _ in range(2)],
        [fresh(9, torch.float32, gen) for _ in range(2)],
    )
    ops.ema_update_(*built, decay=0.5, backend="triton")  # the warm-up step builds it
    fresh_lists = (
        [fresh(9, torch.float32, gen) for _ in range(2)],
        [fresh(9, torch.float32, gen) for _ in range(2)],
    )
    monkeypatch.setattr(_launch, "_capturing", lambda device: True)
    ops.ema_update_(*built, decay=0.5, backend="triton")  # its table exists: fine
    saved = [t.clone() for t in fresh_lists[0]]
    with pytest.raises(BelayInputError, match="CUDA graph is being captured"):
        ops.ema_update_(*fresh_lists, decay=0.5, backend="triton")
    for t, s in zip(fresh_lists[0], saved):
        assert torch.equal(t, s)


def test_a_cpu_scalar_next_to_cuda_tensors_is_passed_by_value():
    """Triton cannot read a CPU pointer from a CUDA kernel: such a scalar is read on the
    host (checked without a GPU: only the argument encoding is involved)."""
    from belay_kernels.backend.triton import _launch

    cuda = torch.device("cuda", 0)
    bits, pointer, from_ptr = _launch.scalar_args(torch.tensor(0.25), cuda, one_minus=True)
    assert (bits, pointer, from_ptr) == (_launch.float_bits(0.75), None, False)
    same = torch.tensor(0.25)
    assert _launch.scalar_args(same, same.device) == (0, same, True)


def test_nan_stays_nan_inside_averaged():
    import belay_kernels as bk

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).to(torch.bfloat16)
    ema = bk.EMA(model, decay=0.9, backend="triton")
    shadow = ema.shadow_params()[0].view(-1).view(torch.int32)
    shadow[:3] = torch.tensor([0x7FFFFFFF, -1, 0x7F800001], dtype=torch.int32)  # -1: 0xFFFFFFFF
    live, saved = model.weight.detach().clone(), shadow.clone()
    with ema.averaged():
        assert torch.isnan(model.weight.detach().view(-1)[:3].float()).all()
    assert torch.equal(model.weight.detach().view(torch.int16), live.view(torch.int16))
    assert torch.equal(shadow, saved)


# --- K EMA shadows of the same weights in one pass (issue 14) ------------------------

from belay_kernels import BelayInputError  # noqa: E402
from belay_kernels.backend.triton import multi_ema as triton_multi  # noqa: E402

# Per profile: 1 - decay on both sides of lerp's 0.5 switch, and decay 0 (an exact copy).
MULTI_DECAYS = (0.9, 0.3, 0.0, 0.999, 0.6)


def _int_bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _decays(k, step, tensors):
    """K decays changing each step; with ``tensors`` every other one a 0-d device tensor."""
    out = []
    for i in range(k):
        d = MULTI_DECAYS[(i + step) % len(MULTI_DECAYS)]
        out.append(torch.tensor(d, dtype=torch.float64) if tensors and i % 2 else d)
    return out


def _multi_case(k, pair, foreach, nonfinite, tensors, seed):
    """K shadows updated by one multi_ema_update_ call per step, against K Triton ema_update_
    calls (bit for bit: the same element math) and K reference calls (the interpreter's
    emulated fma rounds twice, so that comparison uses the suite's tolerance)."""
    weights_dtype, shadow_dtype = pair
    gen = torch.Generator().manual_seed(seed)
    sizes = LIST_SIZES if foreach else (8197,)
    shadows = [[fresh(n, shadow_dtype, gen) for n in sizes] for _ in range(k)]
    by_ema = [[t.clone() for t in profile] for profile in shadows]
    by_reference = [[t.clone() for t in profile] for profile in shadows]
    skip = nonfinite == "skip"
    counters = [torch.zeros((), dtype=torch.int64) for _ in range(3)]
    for step in range(STEPS):
        weights = [fresh(n, weights_dtype, gen, nonfinite=step == 1) for n in sizes]
        decays = _decays(k, step, tensors)
        if foreach:
            triton_multi.multi_ema_update_foreach_(shadows, weights, decays, skip, counters[0])
        else:
            triton_multi.multi_ema_update_(
                [p[0] for p in shadows], weights[0], decays, skip, counters[0]
            )
        for i, decay in enumerate(decays):
            for j, w in enumerate(weights):
                triton_ema.ema_update_(by_ema[i][j], w, decay, skip, counters[1])
                reference.ema_update_(by_reference[i][j], w, decay, skip, counters[2])
        for i in range(k):
            for j in range(len(sizes)):
                where = f"K={k} profile {i} tensor {j} step {step}"
                got = shadows[i][j]
                assert torch.equal(_int_bits(got), _int_bits(by_ema[i][j])), where
                assert_close(got, by_reference[i][j], where)
        assert int(counters[0]) == int(counters[1]) == int(counters[2])
    return shadows, counters[0]


@pytest.mark.parametrize("foreach", [False, True], ids=["flat", "list"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_multi_ema_is_k_ema_updates_bit_for_bit(k, pair, foreach):
    seed = zlib.crc32(f"multi {k} {pair_id(pair)} {foreach}".encode())
    shadows, skipped = _multi_case(k, pair, foreach, "skip", tensors=k > 1, seed=seed)
    sizes = LIST_SIZES if foreach else (8197,)
    # the non-finite step ran, and every profile counted it: K times the bad weights
    assert int(skipped) > 0 and int(skipped) % k == 0
    assert not any(t.isnan().any() for profile in shadows for t in profile), sizes


@pytest.mark.parametrize("foreach", [False, True], ids=["flat", "list"])
@pytest.mark.parametrize("pair", [DTYPE_PAIRS[0], DTYPE_PAIRS[4]], ids=pair_id)
def test_multi_ema_propagate_policy(pair, foreach):
    shadows, skipped = _multi_case(3, pair, foreach, "propagate", tensors=True, seed=41)
    assert int(skipped) == 0
    assert any(t.isnan().any() for profile in shadows for t in profile)


def test_multi_ema_with_eight_profiles():
    _multi_case(8, DTYPE_PAIRS[4], True, "skip", tensors=True, seed=43)


@pytest.mark.parametrize("foreach", [False, True], ids=["flat", "list"])
@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.5])
def test_multi_ema_out_of_range_tensor_decay_leaves_that_profile_and_counts_it(bad, foreach):
    gen = torch.Generator().manual_seed(47)
    sizes = (1, 1009, 3) if foreach else (1009,)
    weights = [fresh(n, torch.bfloat16, gen, nonfinite=True) for n in sizes]
    shadows = [[fresh(n, torch.float32, gen) for n in sizes] for _ in range(3)]
    before = [[t.clone() for t in p] for p in shadows]
    decays = [0.7, torch.tensor(bad, dtype=torch.float64), torch.tensor(0.2)]
    skipped = torch.zeros((), dtype=torch.int64)
    if foreach:
        triton_multi.multi_ema_update_foreach_(shadows, weights, decays, True, skipped)
    else:
        triton_multi.multi_ema_update_([p[0] for p in shadows], weights[0], decays, True, skipped)
    expected_skipped = torch.zeros((), dtype=torch.int64)
    for i, decay in enumerate(decays):
        for j, w in enumerate(weights):
            reference.ema_update_(before[i][j], w, decay, True, expected_skipped)
            assert torch.equal(_int_bits(shadows[i][j]), _int_bits(before[i][j])) or i != 1
            assert_close(shadows[i][j], before[i][j], f"profile {i} tensor {j}")
    bad_weights = sum(int((~w.isfinite()).sum()) for w in weights)
    assert int(skipped) == int(expected_skipped) == sum(sizes) + 2 * bad_weights


@pytest.mark.parametrize("k", [0, 9])
def test_multi_ema_refuses_a_profile_count_it_does_not_cover_before_writing(k):
    gen = torch.Generator().manual_seed(53)
    weights = fresh(31, torch.float32, gen)
    shadows = [fresh(31, torch.float32, gen) for _ in range(k)]
    saved = [s.clone() for s in shadows]
    with pytest.raises(BelayInputError, match="1 to 8 shadows"):
        triton_multi.multi_ema_update_(shadows, weights, [0.9] * k, True, None)
    with pytest.raises(BelayInputError, match="1 to 8 shadows"):
        triton_multi.multi_ema_update_foreach_(
            [[s] for s in shadows], [weights], [0.9] * k, True, None
        )
    assert all(torch.equal(s, t) for s, t in zip(shadows, saved))


def test_multi_ema_refuses_mismatched_decays_and_lists():
    gen = torch.Generator().manual_seed(59)
    weights = [fresh(5, torch.float32, gen), fresh(7, torch.float32, gen)]
    shadows = [[fresh(5, torch.float32, gen), fresh(7, torch.float32, gen)] for _ in range(2)]
    saved = [t.clone() for p in shadows for t in p]
    with pytest.raises(BelayInputError, match="one decay per shadow"):
        triton_multi.multi_ema_update_foreach_(shadows, weights, [0.9], True, None)
    with pytest.raises(BelayInputError, match="one tensor per weights tensor"):
        triton_multi.multi_ema_update_foreach_(
            [shadows[0], shadows[1][:1]], weights, [0.9, 0.8], True, None
        )
    assert all(torch.equal(t, s) for t, s in zip((t for p in shadows for t in p), saved))


def test_multi_ema_rates_never_respecialize_the_kernel():
    """The rates' words are odd and above 2**36 whatever the decay (see _launch.odd_words):
    Triton's int specialization (== 1, divisible by 16) never applies to them."""
    from belay_kernels.backend.triton import _launch

    for decay in (0.0, 1.0, 0.5, 0.999, 5e-324, 1 - 2**-52, 0.25):
        for word in _launch.odd_words(_launch.float_bits(1 - decay)):
            assert word % 2 == 1 and 2**36 < word < 2**37
