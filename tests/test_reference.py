"""The reference ops against a float64 oracle written here, straight from the equations.

The oracle keeps its own float64 state and is never rounded to the storage dtype, so a
trajectory of many steps also checks that rounding does not accumulate into drift.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from belay_kernels import ops
from belay_kernels.testing import DTYPE_PAIRS, ODD_SIZES, random_like_model

STEPS = 40
PAIR_IDS = [f"{str(w)[6:]}-{str(s)[6:]}" for w, s in DTYPE_PAIRS]


def oracle_ema(s, w, decay):
    return s + (1 - decay) * (w - s)


def oracle_swa(s, w, n):
    return w.clone() if n == 0 else s + (w - s) / (n + 1)


def oracle_belay(w, s, alpha, beta):
    return w + beta * (s - w), s + alpha * (w - s)


# Per storage dtype: significand bits, and the frexp exponent of the smallest normal.
_FORMAT = {
    torch.float64: (53, -1021),
    torch.float32: (24, -125),
    torch.bfloat16: (8, -125),
    torch.float16: (11, -13),
}


def half_ulp(exact, dtype):
    """Half an ulp of ``dtype`` at each element of ``exact`` (subnormals included)."""
    bits, min_exp = _FORMAT[dtype]
    _, exp = torch.frexp(exact)
    exp = torch.where(exact == 0, min_exp, exp.clamp(min=min_exp))
    return torch.ldexp(torch.full_like(exact, 0.5), (exp - bits).to(exact.dtype))


def check_one_rounding(actual, exact, weight, diff, opmath, where=""):
    """``actual`` is ``exact`` rounded once to its dtype: within half an ulp of it, plus
    what the math's own rounding in ``opmath`` adds to a ``lerp`` of weight ``weight``
    over ``diff``: the rate rounded, the difference, the product and the sum, a unit of
    opmath each (doubled for fp64, where the float64 oracle rounds as much). A second
    rounding through any narrower dtype, or a rate off by more than a unit, fails."""
    unit = 2.0**-53 if opmath == torch.float64 else 2.0**-24
    units = 6 if opmath == torch.float64 else 3
    slack = units * unit * (exact.abs() + 3 * weight * diff.abs())
    error = (actual.double() - exact).abs()
    allowed = half_ulp(exact, actual.dtype) + slack
    both_nan = actual.isnan() & exact.isnan()
    bad = ~((error <= allowed) | both_nan | (actual.double() == exact))
    assert not bad.any(), (
        f"{where}: {int(bad.sum())} elements more than one rounding from exact, e.g. "
        f"actual {actual[bad][:3].tolist()} exact {exact[bad][:3].tolist()}"
    )


def drift_tolerance(dtype, steps):
    """One storage rounding per step, and the oracle stays exact: rounding errors add up
    at most linearly over steps (each step contracts old errors), relative to the data."""
    ulp = {
        torch.float64: 2**-52,
        torch.float32: 2**-23,
        torch.bfloat16: 2**-8,
        torch.float16: 2**-10,
    }[dtype]
    return dict(atol=steps * ulp * 8, rtol=steps * ulp * 2)


def _fresh(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return random_like_model(n, dtype, generator=g)


def _trajectory(n, seed):
    """Weights as an optimizer would leave them, one row per step, in float64."""
    g = torch.Generator().manual_seed(seed)
    start = random_like_model(n, torch.float64, generator=g)
    noise = torch.randn(STEPS, n, generator=g, dtype=torch.float64) * 0.05
    return start + noise.cumsum(0)


def _check(actual, expected, dtype, steps=STEPS):
    torch.testing.assert_close(actual.double(), expected, **drift_tolerance(dtype, steps))


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_ema_matches_oracle_over_many_steps(n, pair):
    w_dtype, s_dtype = pair
    path = _trajectory(n, seed=n)
    shadow = path[0].to(s_dtype, copy=True)
    exact = shadow.double().clone()
    op = torch.float64 if torch.float64 in pair else torch.float32
    for t in range(1, STEPS):
        weights = path[t].to(w_dtype)
        decay = (0.9, 0.75, 0.999, 0.25)[t % 4]  # weights on either side of lerp's 0.5 switch
        before = shadow.to(torch.float64, copy=True)
        ops.ema_update_(shadow, weights, decay=decay, backend="torch")
        check_one_rounding(
            shadow,
            oracle_ema(before, weights.double(), decay),
            1 - decay,
            weights.double() - before,
            op,
            f"step {t}",
        )
        exact = oracle_ema(exact, weights.double(), decay)
    _check(shadow, exact, s_dtype)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_swa_matches_oracle_over_many_steps(n, pair):
    w_dtype, s_dtype = pair
    path = _trajectory(n, seed=n + 1)
    shadow = _fresh(n, s_dtype, seed=7)  # overwritten by the first update, which copies
    exact = shadow.double().clone()
    op = torch.float64 if torch.float64 in pair else torch.float32
    for t in range(STEPS):
        weights = path[t].to(w_dtype)
        before = shadow.to(torch.float64, copy=True)
        ops.swa_update_(shadow, weights, count=t, backend="torch")
        check_one_rounding(
            shadow,
            oracle_swa(before, weights.double(), t),
            1 / (t + 1),
            weights.double() - before,
            op,
            f"step {t}",
        )
        exact = oracle_swa(exact, weights.double(), t)
        if t == 0:
            assert torch.equal(shadow, weights.to(s_dtype)), "the first SWA update must copy"
    _check(shadow, exact, s_dtype)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_belay_matches_oracle_over_many_steps(n, pair):
    """The oracle runs the coupled system in float64 with the optimizer's displacement
    added to the stored weights each step, as a training loop would."""
    w_dtype, s_dtype = pair
    path = _trajectory(n, seed=n + 2)
    steps = path.diff(dim=0)
    weights = path[0].to(w_dtype, copy=True)
    shadow = path[0].to(s_dtype, copy=True)
    op = torch.float64 if torch.float64 in pair else torch.float32
    for t in range(STEPS - 1):
        weights += steps[t].to(w_dtype)  # the optimizer's step, in storage precision
        w_before, s_before = weights.double().clone(), shadow.double().clone()
        alpha, beta = (0.05, 0.3) if t % 2 else (0.75, 0.6)  # both sides of lerp's switch
        ops.belay_step_(weights, shadow, alpha=alpha, beta=beta, backend="torch")
        exp_w, exp_s = oracle_belay(w_before, s_before, alpha, beta)
        check_one_rounding(weights, exp_w, beta, s_before - w_before, op, f"weights, step {t}")
        check_one_rounding(shadow, exp_s, alpha, w_before - s_before, op, f"shadow, step {t}")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_belay_with_zero_beta_is_exactly_the_ema(pair):
    w_dtype, s_dtype = pair
    w = _fresh(1009, w_dtype, 1)
    s1 = _fresh(1009, s_dtype, 2)
    s2, w_before = s1.clone(), w.clone()
    ops.belay_step_(w, s1, alpha=0.125, beta=0.0, backend="torch")
    ops.ema_update_(s2, w, decay=1 - 0.125, backend="torch")
    assert torch.equal(w, w_before)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_two_point_average_matches_oracle(n, pair):
    w_dtype, s_dtype = pair
    w, snap = _fresh(n, w_dtype, 3), _fresh(n, s_dtype, 4)
    out = ops.two_point_average(w, snap, backend="torch")
    assert out.dtype == w_dtype and out.shape == w.shape
    op = torch.float64 if torch.float64 in pair else torch.float32
    exact = (w.double() + snap.double()) / 2
    check_one_rounding(out, exact, 0.0, exact, op)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize(
    "pair", [(torch.float32,) * 2, (torch.float16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_swap_and_inverse_restore_both_tensors_bit_exactly(n, pair):
    w_dtype, s_dtype = pair
    w, s = _fresh(n, w_dtype, 5), _fresh(n, s_dtype, 6)
    if n > 4:  # the corners of the bit packing: ties, signs, zeros, infinities
        s[:4] = torch.tensor([1 + 2**-8, -(1 + 2**-8), -0.0, float("inf")])
    w0, s0 = w.clone(), s.clone()
    ops.swap_(w, s, backend="torch")
    # the model now holds the shadow, rounded to its dtype (to nearest; ties toward zero)
    torch.testing.assert_close(w.double(), s0.to(w_dtype).double(), atol=0, rtol=2**-8)
    ops.swap_(w, s, inverse=True, backend="torch")
    assert torch.equal(w.view(torch.uint8), w0.view(torch.uint8))
    assert torch.equal(s.view(torch.uint8), s0.view(torch.uint8))


def test_nonfinite_weights_keep_the_shadow_and_are_counted():
    w = _fresh(101, torch.float32, 8)
    w[[3, 50, 100]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    s = _fresh(101, torch.float32, 9)
    before = s.clone()
    skipped = torch.zeros((), dtype=torch.int64)
    ops.ema_update_(s, w, decay=0.5, skipped=skipped, backend="torch")
    assert skipped.item() == 3
    assert torch.equal(s[[3, 50, 100]], before[[3, 50, 100]])
    ok = torch.isfinite(w)
    torch.testing.assert_close(s[ok], torch.lerp(before[ok], w[ok], 0.5))
    ops.ema_update_(s, w, decay=0.5, nonfinite="propagate", backend="torch")
    assert not torch.isfinite(s[[3, 50, 100]]).any()


def test_scalars_may_be_device_tensors():
    w, s = _fresh(33, torch.float32, 10), _fresh(33, torch.float32, 11)
    s2 = s.clone()
    ops.ema_update_(s, w, decay=torch.tensor(0.8, dtype=torch.float64), backend="torch")
    ops.ema_update_(s2, w, decay=0.8, backend="torch")
    assert torch.equal(s, s2)
    ops.swa_update_(s, w, count=torch.tensor(0), backend="torch")
    assert torch.equal(s, w)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    decay=st.floats(0, 1),
    alpha=st.floats(0, 1),
    beta=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_single_steps_match_the_oracle(n, decay, alpha, beta, seed):
    w, s = _fresh(n, torch.float64, seed), _fresh(n, torch.float64, seed + 1)
    ema = s.clone()
    ops.ema_update_(ema, w, decay=decay, backend="torch")
    torch.testing.assert_close(ema, oracle_ema(s, w, decay), atol=1e-12, rtol=1e-12)
    w2, s2 = w.clone(), s.clone()
    ops.belay_step_(w2, s2, alpha=alpha, beta=beta, backend="torch")
    exp_w, exp_s = oracle_belay(w, s, alpha, beta)
    torch.testing.assert_close(w2, exp_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s2, exp_s, atol=1e-12, rtol=1e-12)
