"""The compiled K-profile EMA (multi_ema_update_) against K separate reference
``ema_update_`` calls, bit for bit: on the CPU loops and on the CUDA bodies over a
simulated grid, every dtype pair, odd sizes, many steps, both non-finite policies, decays
as numbers and as 0-d tensors (NaN and out of range among them), flat and list.

The compiled lerp is one fused multiply-add on every CPU; the reference's is torch's,
fused only under ATen's vector kernels. Where ATen runs its default kernels
(``ATEN_CPU_CAPABILITY=default``, or a CPU without AVX2), the results are compared bit for
bit with K compiled ``ema_update_`` calls instead, and within tolerance with the
reference."""

import pytest
import torch
from _backend_cases import _inject_nonfinite, pair_id
from _extension_cases import (  # noqa: F401 (cpp_backend, one_cpu_thread: fixtures)
    cpp_backend,
    one_cpu_thread,
    refuses,
)
from _fingerprints import lerp_rounding
from _grid import simulated_grid

from belay_kernels import reference
from belay_kernels.testing import DTYPE_PAIRS, random_like_model

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

STEPS = 5
NONFINITE_STEP = 2
SIZES = (0, 1, 3, 31, 1009, 1_000_003)
# Numbers on both sides of lerp's switch, the exact copy (0), and 0-d tensors: valid, NaN
# and out of range (those two leave their profile as it was and count every element).
NUMBER_DECAYS = (0.9, 0.3, 0.0, 0.999, 0.5, 0.75, 0.1, 0.99)
# Every rate under 0.5, where the CPU loop takes each lerp's one side (lerp_below_half);
# 0.5000001 gives a rate just under 0.5.
ABOVE_HALF_DECAYS = (0.9, 0.999, 0.5000001, 0.75, 0.99, 0.95, 0.6, 0.9999)
TENSOR_DECAYS = (0.95, float("nan"), 1.5, -0.25)


# Whether the reference rounds as the compiled kernels do, in this process.
REFERENCE_FUSED = lerp_rounding() == "fused"


def _backend():
    from belay_kernels.backend import cpp

    return cpp


def _decays(k, tensors):
    """k decays; with ``tensors`` every other one is a 0-d float64 tensor, among them a NaN
    and an out-of-range one once k > 2."""
    decays = list(NUMBER_DECAYS[:k])
    if tensors:
        for p in range(1, k, 2):
            decays[p] = torch.tensor(
                TENSOR_DECAYS[(p // 2) % len(TENSOR_DECAYS)], dtype=torch.float64
            )
    return decays


def _placed(t, offset):
    """A copy of ``t`` whose storage starts ``offset`` elements earlier (unaligned start)."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype)
    return storage[offset:].copy_(t)


def _finite_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _same_bits(got, want, message):
    assert got.dtype == want.dtype and got.shape == want.shape, message
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{message}: NaN positions differ"
    # NaN payloads aside (fp16 through F16C keeps its payload: cpu_half_staging.h)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    differ = (got.view(bits) != want.view(bits)) & ~nan
    assert not differ.any(), f"{message}: {int(differ.sum())} elements differ"


def check_against_reference(
    k, pair, sizes, *, skip, tensor_decays, seed, offset=0, steps=STEPS, grid=False, decays=None
):
    """Runs ``steps`` steps through the cpp backend (one list call when ``sizes`` has more
    than one entry) and through K reference ema_update_ calls per tensor; compares all.
    Where the reference's lerp is not fused, the bits are compared with K compiled
    ema_update_ calls on the same backend, and the reference within tolerance. ``decays``
    replaces _decays(k, tensor_decays)."""
    exact = REFERENCE_FUSED
    weights_dtype, shadow_dtype = pair
    generator = torch.Generator().manual_seed(seed)
    shadows = [
        [_placed(random_like_model(n, shadow_dtype, generator=generator), offset) for n in sizes]
        for _ in range(k)
    ]
    expected = [[s.clone() for s in profile] for profile in shadows]
    separate = [[s.clone() for s in profile] for profile in shadows]
    skipped_separate = torch.zeros((), dtype=torch.int64)
    decays = list(decays) if decays is not None else _decays(k, tensor_decays)
    skipped = torch.zeros((), dtype=torch.int64)
    skipped_ref = torch.zeros((), dtype=torch.int64)
    backend = _backend()
    # the largest finite magnitude the lerps have blended so far
    magnitude = max([_finite_max(s) for profile in shadows for s in profile], default=0.0)
    for step in range(steps):
        weights = [
            _placed(random_like_model(n, weights_dtype, generator=generator), offset) for n in sizes
        ]
        magnitude = max([magnitude, *(_finite_max(w) for w in weights)])
        if step == NONFINITE_STEP:
            for w in weights:
                _inject_nonfinite(w, generator)
        if len(sizes) == 1:
            backend.multi_ema_update_([p[0] for p in shadows], weights[0], decays, skip, skipped)
        else:
            backend.multi_ema_update_foreach_(shadows, weights, decays, skip, skipped)
        for p, decay in enumerate(decays):
            for s, e, w in zip(expected[p], separate[p], weights):
                reference.ema_update_(s, w, decay, skip, skipped_ref)
                if not exact:
                    backend.ema_update_(e, w, decay, skip, skipped_separate)
        for p in range(k):
            for i, (got, want) in enumerate(zip(shadows[p], expected[p])):
                message = f"step {step} profile {p} tensor {i} ({got.numel()})"
                if not exact:
                    _same_bits(got, separate[p][i], message)
                    # each step's lerp may round differently, by at most a unit in the
                    # last place of the larger value it blends, and the EMA carries that
                    # on (times the decay): step + 1 such units apart at the most
                    bound = (step + 1) * torch.finfo(got.dtype).eps * magnitude
                    torch.testing.assert_close(
                        got.double(),
                        want.double(),
                        rtol=0,
                        atol=bound,
                        equal_nan=True,
                        msg=lambda m, message=message: f"{message}\n{m}",
                    )
                else:
                    _same_bits(got, want, message)
    assert int(skipped) == int(skipped_ref)
    if not exact:
        assert int(skipped) == int(skipped_separate)
    return int(skipped)


K_VALUES = (1, 2, 3, 5, 8)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", K_VALUES)
def test_flat_matches_k_reference_updates(k, pair, skip):
    for n in SIZES:
        skipped = check_against_reference(k, pair, [n], skip=skip, tensor_decays=False, seed=n + k)
        assert (skipped > 0) == (skip and n > 0)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", (2, 3, 5, 8))
def test_every_decay_above_half(k, pair, skip):
    """The loop for rates all under 0.5, with numbers and with 0-d tensors; then one rate of
    exactly 0.5 among them sends the call back to the two-sided lerp."""
    above = list(ABOVE_HALF_DECAYS[:k])
    as_tensors = [torch.tensor(d, dtype=torch.float64) if p % 2 else d for p, d in enumerate(above)]
    with_half = above[:-1] + [0.5]
    for decays in (above, as_tensors, with_half):
        for n in (1, 31, 1009, 70_001):
            skipped = check_against_reference(
                k, pair, [n], skip=skip, tensor_decays=False, seed=n + k, decays=decays
            )
            assert (skipped > 0) == skip


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", (2, 3, 5, 8))
def test_tensor_decays_nan_and_out_of_range(k, pair):
    for skip in (True, False):
        skipped = check_against_reference(k, pair, [1009], skip=skip, tensor_decays=True, seed=k)
        # each NaN or out-of-range decay counts all 1009 elements every step
        invalid = sum(1 for d in _decays(k, True) if not 0 <= float(d) <= 1)
        assert invalid == (k > 3) + (k > 5) + (k > 7)
        assert skipped >= invalid * 1009 * STEPS


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_unaligned_starts(pair, offset):
    check_against_reference(
        3, pair, [70_001], skip=True, tensor_decays=True, seed=offset, offset=offset
    )


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", (1, 3, 5))
def test_lists_match_k_reference_updates(k, pair):
    sizes = [1009, 0, 3, 70_001, 1, 31]
    check_against_reference(k, pair, sizes, skip=True, tensor_decays=True, seed=k)
    check_against_reference(k, pair, sizes, skip=False, tensor_decays=False, seed=k + 1)


# --- the CUDA bodies over a simulated grid ---------------------------------------------

GRIDS = ((1, 1), (3, 32), (2, 5))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", (1, 2, 3, 5))
def test_grid_flat_matches_k_reference_updates(k, pair, grid):
    with simulated_grid(*grid):
        for n in (0, 1, 3, 31, 1009, 20_011):
            for skip, tensors, offset in ((True, False, 0), (False, True, 1), (True, True, 3)):
                check_against_reference(
                    k,
                    pair,
                    [n],
                    skip=skip,
                    tensor_decays=tensors,
                    seed=n + k,
                    offset=offset,
                    steps=3 + skip,
                    grid=True,
                )


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("k", (1, 3, 5, 8))
def test_grid_lists_match_k_reference_updates(k, pair):
    # 30 tensors: more than one launch holds for these ops (fewer per launch as K grows),
    # and a tensor of more chunks than one launch holds
    sizes = [20_011, 0, 1, 3, 31, 1009] * 5
    with simulated_grid(1, 32):
        check_against_reference(
            k, pair, sizes, skip=True, tensor_decays=True, seed=k, offset=1, steps=3, grid=True
        )
    with simulated_grid(16, 4, chunk=4096):
        check_against_reference(
            k, pair, [20_011, 3, 1009], skip=False, tensor_decays=False, seed=k, steps=3, grid=True
        )


def test_grid_simulation_runs_the_multi_ema_body():
    """A grid of zero threads leaves every shadow untouched, so the grid tests above run
    the CUDA body rather than the CPU loop."""
    shadows, weights = [torch.ones(100), torch.ones(100)], torch.full((100,), 3.0)
    with simulated_grid(1, 0):
        _backend().multi_ema_update_(shadows, weights, [0.5, 0.1], True, None)
    assert all(torch.equal(s, torch.ones(100)) for s in shadows)


# --- the registered ops -----------------------------------------------------------------


def _ops():
    from belay_kernels.backend._library import ops

    return ops()


def _samples():
    generator = torch.Generator().manual_seed(0)
    w = random_like_model(1009, torch.bfloat16, generator=generator)
    w2 = random_like_model(31, torch.bfloat16, generator=generator)
    s = [random_like_model(1009, torch.float32, generator=generator) for _ in range(3)]
    s2 = [random_like_model(31, torch.float32, generator=generator) for _ in range(3)]
    counter = torch.zeros((), dtype=torch.int64)
    rate = torch.tensor([0.1], dtype=torch.float64)
    yield "multi_ema_update_", (s, w, [0.9, 0.5, 0.1], [], True, counter)
    yield "multi_ema_update_", (s[:2], w, [0.9, 0.0], [None, rate], False, None)
    yield (
        "multi_ema_update_foreach_",
        ([s[0], s2[0], s[1], s2[1]], [w, w2], [0.9, 0.3], [rate, None], True, counter),
    )


@pytest.mark.parametrize(
    "name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_opcheck(name, args):
    torch.library.opcheck(getattr(_ops(), name).default, args)


def test_refuses_bad_input_before_writing():
    ops = _ops()
    w = torch.randn(10)
    s = [torch.randn(10) for _ in range(9)]
    refuses(lambda: ops.multi_ema_update_(s, w, [0.9] * 9, [], True, None), "1 to 8", *s)
    refuses(lambda: ops.multi_ema_update_([], w, [], [], True, None), "1 to 8")
    refuses(lambda: ops.multi_ema_update_(s[:2], w, [0.9], [], True, None), "one decay", *s)
    refuses(
        lambda: ops.multi_ema_update_(s[:2], w, [0.9, 1.5], [], True, None),
        r"decays\[1\] must be in \[0, 1\]",
        *s[:2],
    )
    refuses(
        lambda: ops.multi_ema_update_(s[:2], w, [0.9, 0.9], [None], True, None),
        "decay_tensors has 1",
        *s[:2],
    )
    refuses(
        lambda: ops.multi_ema_update_(
            s[:2], w, [0.9, 0.9], [None, torch.tensor([0.9])], True, None
        ),
        "float64",
        *s[:2],
    )
    refuses(
        lambda: ops.multi_ema_update_([s[0], s[1].double()], w, [0.9, 0.9], [], True, None),
        "one shadow dtype",
        s[0],
    )
    refuses(
        lambda: ops.multi_ema_update_([s[0], s[1][:5]], w, [0.9, 0.9], [], True, None),
        r"shadows\[1\] has 5",
        s[0],
    )
    refuses(
        lambda: ops.multi_ema_update_([s[0], s[0]], w, [0.9, 0.9], [], True, None),
        "share memory",
        s[0],
    )
    refuses(
        lambda: ops.multi_ema_update_([s[0], w], w, [0.9, 0.9], [], True, None),
        "share memory",
        s[0],
        w,
    )
    refuses(
        lambda: ops.multi_ema_update_foreach_(s[:3], [w, w.clone()], [0.9, 0.9], [], True, None),
        "3 shadows",
        *s[:3],
    )
    half = [t.half() for t in s[:2]]
    refuses(
        lambda: ops.multi_ema_update_(half, w, [0.9, 0.9], [], True, None),
        "no compiled kernel",
        *half,
    )


def test_supports():
    from belay_kernels.backend import cpp

    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    assert cpp.supports("multi_ema_update_", (f32, f32, bf16))
    assert cpp.supports("multi_ema_update_foreach_", (f32,) * 9)
    assert not cpp.supports("multi_ema_update_", (f32,) * 10)  # 9 profiles
    assert not cpp.supports("multi_ema_update_", (f32, f64, f32))
    assert not cpp.supports("multi_ema_update_", (bf16, f32))
