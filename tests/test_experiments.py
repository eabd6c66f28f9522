"""Every ``belay-kernels reproduce`` experiment in --quick mode, with the quantitative
checks of the seed documents' claims; plus the theory and physics helpers they use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from belay_kernels import experiments  # noqa: E402
from belay_kernels.averagers import Belay  # noqa: E402
from belay_kernels.experiments._common import generator  # noqa: E402
from belay_kernels.experiments._toy import ROSENBROCK, Arm, run_arms  # noqa: E402
from belay_kernels.physics import DampedTwoMass, linear_step_matrix  # noqa: E402
from belay_kernels.theory import equivalent_lr_schedule, two_point_effective_lr  # noqa: E402

_cache: dict[str, experiments._common.Result] = {}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


def quick(name, out_dir):
    if name not in _cache:
        _cache[name] = experiments.run(name, quick=True, out_dir=out_dir)
    return _cache[name]


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_experiment_writes_figure_and_table(name, results_dir):
    result = quick(name, results_dir)
    png, md = results_dir / f"{name}.png", results_dir / f"{name}.md"
    assert png.stat().st_size > 10_000
    assert result.table in md.read_text() and f"({name}.png)" in md.read_text()


def test_lemma2_holds_to_rounding_with_constant_gradients(results_dir):
    checks = quick("sandler-table1", results_dir).checks
    for method, error in checks["exact_max_error"].items():
        assert error < 1e-12, method
    # an EMA started long before t1 differs by exactly decay^k (shadow_t1 - theta_t1) ...
    assert checks["ema_long_residual"] < 1e-12
    # ... which is the paper's approximation: it vanishes once k >> 1/delta
    errors = checks["ema_long_error"]
    assert errors[max(errors)] < 0.1 < errors[min(errors)]


def test_eq13_stationary_radius_within_10_percent(results_dir):
    for lr, ratio in quick("sandler-stationary", results_dir).checks["eq13_ratio"].items():
        assert abs(ratio - 1) < 0.10, (lr, ratio)


def test_eq20_two_point_lr_within_10_percent_for_a_large_gap(results_dir):
    ratios = quick("sandler-stationary", results_dir).checks["eq20_ratio_large_gap"]
    assert abs(ratios[1.0] - 1) < 0.10 and abs(ratios[0.1] - 1) < 0.10, ratios


def test_eq19_ema_covariance(results_dir):
    for key, ratio in quick("sandler-stationary", results_dir).checks["eq19_ratio"].items():
        assert abs(ratio - 1) < 0.10, (key, ratio)


def test_fig9_ordering_of_stationary_losses(results_dir):
    checks = quick("sandler-fig9", results_dir).checks
    lr0, lr1, ema = (checks["stationary"][k] for k in experiments.sandler_fig9.RUNS)
    assert lr0 > lr1 and lr0 > ema
    fast = [checks["fast"][k] for k in experiments.sandler_fig9.RUNS]
    assert fast[2] < fast[1] < fast[0]  # the EMA acts mostly on the fast coordinates
    reach = [checks["reach_slow"][k] for k in experiments.sandler_fig9.RUNS]
    assert reach[2] < reach[1]  # ... without the small learning rate's slow convergence


def test_ou_covariance_and_distances(results_dir):
    checks = quick("ou-swa", results_dir).checks
    for lr, errors in checks["cov_rel_error"].items():
        assert errors["exact"] < 0.10, lr
    small_lr = checks["final_rms"][min(checks["final_rms"])]
    assert small_lr["swa"] < small_lr["ema"] < small_lr["iterate"]


def test_rosenbrock_belay_survives_learning_rates_that_break_sgd(results_dir):
    robust = quick("belay-rosenbrock", results_dir).checks["robust"]
    assert (
        robust["sgd", "BELAY a=0.01 b=0.9"]["stable_lrs"]
        > robust["sgd", "no averaging"]["stable_lrs"]
    )


def test_rosenbrock_runs_both_forms_of_belay(results_dir):
    robust = quick("belay-rosenbrock", results_dir).checks["robust"]
    for opt in ("sgd", "adam"):
        for beta in experiments.belay_rosenbrock.BETAS:
            assert (opt, f"BELAY a=0.01 b={beta:g}") in robust
            assert (opt, f"BELAY poster a=0.01 b={beta:g}") in robust


def test_functions_race_both_forms_of_belay(results_dir):
    result = quick("belay-functions", results_dir)
    methods = {method for _, _, method in result.checks["steps"]}
    assert methods == {"none", "ema", "belay", "poster"}
    assert "poster race: first to cross" in result.table


def test_digits_learns(results_dir):
    accuracy = quick("belay-digits", results_dir).checks["final_accuracy"]
    assert accuracy["SGD, no averaging (live)"] > 50
    # both forms of BELAY learn with the lightest shadow, and follow each other at every m2
    assert accuracy["BELAY m2=2 (shadow)"] > 50 and accuracy["BELAY poster m2=2 (shadow)"] > 50
    for m2 in experiments.belay_digits.MASSES:
        post_step, poster = (
            accuracy[f"BELAY{form} m2={m2:g} (shadow)"] for form in ("", " poster")
        )
        assert abs(post_step - poster) < 5, (m2, post_step, poster)


def _rosenbrock_arms(arms, steps=30, seed=5):
    return run_arms(
        ROSENBROCK, arms, seeds=3, steps=steps, noise=1.0, gen=generator(seed), record_every=10
    )


def test_poster_arms_leave_the_other_arms_unchanged():
    arms = [Arm("sgd", 1e-3), Arm("adam", 0.03, "ema", 0.05), Arm("sgd", 1e-3, "belay", 0.05, 0.3)]
    poster = [Arm("sgd", 1e-3, "poster", 0.05, 0.3), Arm("adam", 0.03, "poster", 0.05, 0.1)]
    alone = _rosenbrock_arms(arms)
    both = _rosenbrock_arms([arms[0], poster[0], arms[1], poster[1], arms[2]])
    kept = [0, 2, 4]
    for name in ("evaluated", "live", "diverged"):
        np.testing.assert_array_equal(getattr(alone, name), getattr(both, name)[kept])
    assert torch.equal(alone.final_live, both.final_live[kept])
    assert torch.equal(alone.final_evaluated, both.final_evaluated[kept])


def test_poster_arm_runs_the_posters_equations_on_its_twins_noise():
    """w1 <- (1 - beta) (w1 + eta f(w1)) + beta w2, w2 <- (1 - alpha) w2 + alpha w1, with
    f = -(gradient + the noise its post-step twin saw), in float64 by hand."""
    lr, alpha, beta, steps = 1e-3, 0.05, 0.3, 30
    arms = [
        Arm("sgd", lr, "belay", alpha, beta),
        Arm("sgd", lr, "poster", alpha, beta),
        Arm("adam", 0.03, "poster", alpha, 0.1),  # no twin: noise of its own
    ]
    result = _rosenbrock_arms(arms, steps)
    gen = generator(5)
    w = torch.tensor(ROSENBROCK.start, dtype=torch.float64).expand(3, 2).clone()
    s = w.clone()
    for _ in range(steps):
        noise = torch.randn((3, 2), generator=gen, dtype=torch.float64)  # the twin's draw
        moved = w - lr * (ROSENBROCK.gradient(w) + noise)
        w, s = (1 - beta) * moved + beta * s, (1 - alpha) * s + alpha * w
    torch.testing.assert_close(result.final_live[1], w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.final_evaluated[1], s, rtol=1e-12, atol=1e-12)
    assert not result.diverged.any() and np.isfinite(result.evaluated).all()
    assert not torch.equal(result.final_live[0], result.final_live[1])  # the forms differ


def test_damped_system_is_belay_at_critical_damping(results_dir):
    for problem, difference in quick("belay-damping", results_dir).checks["exact"].items():
        assert difference == 0.0, problem


# --- the library pieces the experiments rest on ----------------------------------------------


def test_equivalent_lr_schedule_table1():
    k = 7
    swa = equivalent_lr_schedule("swa", k)
    assert torch.allclose(swa, torch.arange(k, 0, -1, dtype=torch.float64) / k)
    assert torch.equal(
        equivalent_lr_schedule("two_point", k), torch.full((k,), 0.5, dtype=torch.float64)
    )
    ema = equivalent_lr_schedule("ema", k, decay=0.9)
    assert torch.allclose(ema, 1 - 0.9 ** torch.arange(k, 0, -1, dtype=torch.float64))
    with pytest.raises(ValueError, match="decay"):
        equivalent_lr_schedule("ema", k)
    with pytest.raises(ValueError, match="unknown method"):
        equivalent_lr_schedule("median", k)


def test_two_point_effective_lr_limits():
    assert two_point_effective_lr(0.1, 1.0, 0) == pytest.approx(0.1)
    assert two_point_effective_lr(0.1, 1.0, 10_000) == pytest.approx(0.05)


def test_linear_step_matrix_matches_the_damped_system():
    gen = torch.Generator().manual_seed(0)
    lr_h, alpha, beta, zeta = 0.3, 0.05, 0.2, 0.6
    start = torch.randn(1, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(start.clone())
    system = DampedTwoMass(
        [w], k=2 * beta, m1=1.0, m2=beta / alpha, c1=2 * zeta, c2=2 * zeta * beta / alpha
    )
    matrix = linear_step_matrix(lr_h, alpha=alpha, beta=beta, zeta1=zeta, zeta2=zeta)
    state = np.array([start.item(), start.item(), 0.0, 0.0])
    for _ in range(20):
        with torch.no_grad():
            w.mul_(1 - lr_h)  # SGD on h w^2 / 2
        system.step()
        state = matrix @ state
        got = [
            w.item(),
            system.shadow_params()[0].item(),
            system.velocities1[0].item(),
            system.velocities2[0].item(),
        ]
        np.testing.assert_allclose(got, state, rtol=1e-12, atol=1e-15)


def test_damped_system_differs_from_belay_away_from_critical_damping():
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(5, generator=gen, dtype=torch.float64)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    belay = Belay.from_physics([a], k=0.2, m1=1.0, m2=5.0)
    damped = DampedTwoMass([b], k=0.2, m1=1.0, m2=5.0, c1=1.0)
    for _ in range(5):
        step = torch.randn(5, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            a.add_(step)
            b.add_(step)
        belay.step()
        damped.step()
    assert not torch.equal(a, b)


def test_eq19_general_kernel_matches_its_closed_forms():
    from belay_kernels.theory import ema_variance_factor, kernel_variance_factor

    lr, kappa, decay = 0.05, 0.3, 0.9
    lags = np.arange(400)
    ema_autocorrelation = (1 - decay) * decay**lags / (1 + decay)  # sum_k mu_k mu_{k+d}
    assert kernel_variance_factor(ema_autocorrelation, lr, kappa) == pytest.approx(
        ema_variance_factor(decay, lr, kappa), rel=1e-9
    )
    gap = 7  # two-point kernel: C_0 = 1/2, C_gap = 1/4
    two_point = np.zeros(gap + 1)
    two_point[0], two_point[gap] = 0.5, 0.25
    assert kernel_variance_factor(two_point, lr, kappa) == pytest.approx(
        two_point_effective_lr(lr, kappa, gap) / lr, rel=1e-12
    )
