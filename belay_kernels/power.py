"""The math of the power-function EMA and of post-hoc reconstruction (Karras et al.,
"Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, 2024), in one
place. Time is counted in optimizer steps.

- The profile with exponent ``gamma`` seen at time ``t`` weights the weights at time
  ``tau <= t`` by ``(gamma + 1) tau^gamma / t^(gamma + 1)`` (EDM2 eq. 121).
- Its relative width is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``
  (eq. 123); ``gamma`` is the largest real root of
  ``g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2)`` (eq. 126).
- The discrete EMA that follows it: at the n-th update ``decay_n = (1 - 1/n)^(gamma + 1)``
  (eq. 127 with one update as the unit), so the first update copies. After n updates the
  weights of update i carry ``(i^(gamma+1) - (i-1)^(gamma+1)) / n^(gamma+1)``: the
  continuous profile integrated over the i-th update's interval, exactly.
- Updating every k steps keeps the profile: the n-th update happens at step ``n k`` and
  uses ``decay_n`` as above, which is EDM2's ``(1 - k / t)^(gamma + 1)`` at ``t = n k``.
- Reconstruction (EDM2 Algorithm 3): the Gram matrix ``A`` of the snapshot profiles
  (eq. 151), their inner products ``B`` with the target, ``X = solve(A, B)``, each column
  divided by its sum.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import BelayInputError

# sigma_rel of gamma = 0, the widest valid profile: gamma > 0 <=> sigma_rel < this
SIGMA_REL_MAX = math.sqrt(1 / 12)


def _is_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_gamma(gamma: object) -> float:
    if not _is_number(gamma) or not gamma > 0:
        raise BelayInputError(
            f"gamma must be a number > 0, got {gamma!r}; a larger gamma is a shorter EMA "
            "(sigma_rel 0.05 is gamma 16.97, 0.10 is 6.94)."
        )
    return float(gamma)


def check_sigma_rel(sigma_rel: object) -> float:
    if not _is_number(sigma_rel) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise BelayInputError(
            f"sigma_rel must be in (0, sqrt(1/12) = {SIGMA_REL_MAX:.4f}), got {sigma_rel!r}: "
            "it is the EMA's width relative to the training time, and only gamma > 0 "
            "(sigma_rel below sqrt(1/12)) is a power-function profile. EDM2 uses 0.05 to 0.10."
        )
    return float(sigma_rel)


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 123."""
    g = check_gamma(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 eq. 126: the largest real root of the cubic."""
    s = check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))


def resolve_gamma(sigma_rel: object = None, gamma: object = None) -> float:
    """The gamma given by exactly one of ``sigma_rel`` and ``gamma``."""
    if (sigma_rel is None) == (gamma is None):
        raise BelayInputError(
            f"give exactly one of sigma_rel and gamma, got sigma_rel={sigma_rel!r}, "
            f"gamma={gamma!r} (e.g. sigma_rel=0.05)."
        )
    return sigma_rel_to_gamma(sigma_rel) if gamma is None else check_gamma(gamma)


def decay(n: int, gamma: float) -> float:
    """The decay of the n-th update (n = 1, 2, ...); 0 for the first, which copies."""
    return (1.0 - 1.0 / n) ** (gamma + 1.0)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner products of the continuous profiles ``(t_a, gamma_a)`` and ``(t_b, gamma_b)``
    over time (EDM2 eq. 151), broadcast: ``(ga+1)(gb+1) / (ga+gb+1) * lo^(ga+gb+1) /
    (t_a^(ga+1) t_b^(gb+1))`` with ``lo = min(t_a, t_b)``, taken through the ratio of the
    times so that large exponents cannot overflow."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)  # <= 1
    # the later profile's exponent sees the earlier profile's end
    power = np.where(a_first, g_b, g_a)
    longer = np.maximum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio**power / longer


def coefficients(steps, gammas, target_step: float, target_gamma: float) -> np.ndarray:
    """The weight of each snapshot profile ``(steps[i], gammas[i])`` in the least-squares
    fit of the target profile, normalised to sum 1 (EDM2 Algorithm 3)."""
    t = np.asarray(steps, dtype=np.float64)[:, None]
    g = np.asarray(gammas, dtype=np.float64)[:, None]
    gram = profile_dot(t, g, t.T, g.T)
    rhs = profile_dot(t, g, float(target_step), float(target_gamma))
    x = np.linalg.solve(gram, rhs)[:, 0]
    return x / x.sum()


def profile(tau, t: float, gamma: float) -> np.ndarray:
    """The continuous profile ``(t, gamma)`` at times ``tau`` (0 after ``t``), for plots."""
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau >= 0) & (tau <= t)
    return np.where(inside, (gamma + 1) * np.clip(tau / t, 0, 1) ** gamma / t, 0.0)
