"""Closed-form predictions from Sandler et al. ("Training trajectories, mini-batch losses and
the curious role of the learning rate") and the Ornstein-Uhlenbeck picture of SGD.

The experiments in :mod:`belay_kernels.experiments` check these against simulations that run
through the library's averagers. Notation: ``lr`` is the paper's lambda, ``kappa`` an
eigenvalue of the (whitened) Hessian Omega, ``decay`` the library's EMA decay, so the
paper's EMA rate is ``delta = 1 - decay``.
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("swa", "two_point", "ema")


def equivalent_lr_schedule(method: str, k: int, *, decay: float | None = None) -> torch.Tensor:
    """Table 1: the learning-rate multipliers for the last ``k`` steps that make plain SGD
    land where the averaged trajectory is (Lemma 2, gradients constant per batch).

    Entry ``i - 1`` (``i = 1..k``) multiplies the learning rate of step ``i``, the step that
    moves ``theta_{t1+i-1}`` to ``theta_{t1+i}``; the average is read at ``t2 = t1 + k``.

    - ``"swa"``: the mean of the k iterates ``theta_{t1+1} .. theta_{t1+k}``: ``(k+1-i)/k``.
    - ``"two_point"``: ``(theta_{t1} + theta_{t1+k}) / 2``: ``1/2``.
    - ``"ema"``: an EMA with ``decay`` (``delta = 1 - decay``) whose shadow equals
      ``theta_{t1}`` at ``t1``: ``1 - (1 - delta)^(k+1-i)``. This is the paper's
      ``1 - (1 - delta)^(k-i)`` with ``i`` counted from 0. An EMA started earlier differs
      from it by exactly ``(1 - delta)^k (shadow_{t1} - theta_{t1})``, the term the paper
      drops by assuming ``k >> 1/delta``.
    """
    if k < 1:
        raise ValueError(f"the window k must be a positive number of steps, got {k}.")
    i = torch.arange(1, k + 1, dtype=torch.float64)
    if method == "swa":
        return (k + 1 - i) / k
    if method == "two_point":
        return torch.full((k,), 0.5, dtype=torch.float64)
    if method == "ema":
        if decay is None or not 0.0 <= decay < 1.0:
            raise ValueError(f"method 'ema' needs decay in [0, 1), got {decay!r}.")
        return 1.0 - torch.as_tensor(decay, dtype=torch.float64) ** (k + 1 - i)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def stationary_radius(noise_norm: float, lr) -> np.ndarray:
    """Lemma 1 / eq. 13: the distance from the minimum settles at ``||c|| sqrt(lr / 2)``."""
    return noise_norm * np.sqrt(np.asarray(lr, dtype=float) / 2.0)


def sgd_stationary_variance(lr, kappa) -> np.ndarray:
    """Exact stationary variance of ``u <- (1 - lr kappa) u + lr xi`` with unit-variance
    noise: ``S_lambda = lr / (kappa (2 - lr kappa))`` (the paper's S_lambda, one mode)."""
    lr, kappa = np.asarray(lr, dtype=float), np.asarray(kappa, dtype=float)
    return lr / (kappa * (2.0 - lr * kappa))


def kernel_variance_factor(autocorrelation, lr, kappa) -> np.ndarray:
    """Eq. 19 for one mode: ``F / S_lambda = C_0 + 2 sum_{d>=1} C_d (1 - lr kappa)^d``,
    where ``autocorrelation[d] = C_d = sum_k mu_k mu_{k+d}`` of the averaging kernel mu."""
    c = np.asarray(autocorrelation, dtype=float)
    gamma = 1.0 - np.asarray(lr, dtype=float) * np.asarray(kappa, dtype=float)
    d = np.arange(1, len(c))
    return c[0] + 2.0 * np.sum(c[1:] * np.power.outer(gamma, d), axis=-1)


def ema_variance_factor(decay: float, lr, kappa) -> np.ndarray:
    """Eq. 19 in closed form for the EMA kernel ``mu_k = delta (1 - delta)^k``:
    ``C_d = delta (1 - delta)^d / (2 - delta)``, so the sum is geometric."""
    delta = 1.0 - decay
    g = decay * (1.0 - np.asarray(lr, dtype=float) * np.asarray(kappa, dtype=float))
    return delta / (2.0 - delta) * (1.0 + 2.0 * g / (1.0 - g))


def two_point_effective_lr(lr, kappa, gap) -> np.ndarray:
    """Eq. 20: ``lr (1 + (1 - lr kappa)^gap) / 2``; tends to ``lr / 2`` for a large gap."""
    lr = np.asarray(lr, dtype=float)
    return lr * (1.0 + (1.0 - lr * np.asarray(kappa, dtype=float)) ** np.asarray(gap)) / 2.0


def ou_stationary_covariance(hessian, noise_cov, lr) -> np.ndarray:
    """The OU (continuous-time) approximation of SGD ``theta <- theta - lr (H theta + eps)``,
    ``Cov(eps) = Sigma``: solve ``H S + S H = lr Sigma`` (Mandt et al.)."""
    h, sigma = np.asarray(hessian, dtype=float), np.asarray(noise_cov, dtype=float)
    n = h.shape[0]
    eye = np.eye(n)
    lyapunov = np.kron(eye, h) + np.kron(h, eye)
    return np.linalg.solve(lyapunov, lr * sigma.reshape(-1)).reshape(n, n)


def discrete_lyapunov(transition, noise_cov) -> np.ndarray:
    """The stationary covariance ``S = A S A^T + Q`` of ``x <- A x + noise``, Cov = Q."""
    a, q = np.asarray(transition, dtype=float), np.asarray(noise_cov, dtype=float)
    n = a.shape[0]
    return np.linalg.solve(np.eye(n * n) - np.kron(a, a), q.reshape(-1)).reshape(n, n)


def sgd_stationary_covariance(hessian, noise_cov, lr) -> np.ndarray:
    """The exact discrete stationary covariance of the same SGD:
    ``S = (I - lr H) S (I - lr H)^T + lr^2 Sigma``."""
    h = np.asarray(hessian, dtype=float)
    return discrete_lyapunov(
        np.eye(h.shape[0]) - lr * h, lr**2 * np.asarray(noise_cov, dtype=float)
    )


def sgd_ema_stationary_covariance(hessian, noise_cov, lr, decay) -> np.ndarray:
    """Exact stationary covariance of the EMA of that SGD, from the joint linear system
    ``theta' = G theta - lr eps``, ``s' = decay s + (1 - decay) theta'`` with G = I - lr H."""
    h, sigma = np.asarray(hessian, dtype=float), np.asarray(noise_cov, dtype=float)
    n = h.shape[0]
    g = np.eye(n) - lr * h
    delta = 1.0 - decay
    transition = np.block([[g, np.zeros((n, n))], [delta * g, decay * np.eye(n)]])
    mix = np.vstack([-lr * np.eye(n), -delta * lr * np.eye(n)])  # how eps enters (theta, s)
    return discrete_lyapunov(transition, mix @ sigma @ mix.T)[n:, n:]


def sgd_window_mean_covariance(hessian, noise_cov, lr, window: int) -> np.ndarray:
    """Exact covariance of the mean of ``window`` consecutive stationary SGD iterates:
    ``(1/W^2) [W S + sum_{l=1}^{W-1} (W - l) (G^l S + S G^l^T)]`` with G = I - lr H."""
    h = np.asarray(hessian, dtype=float)
    s = sgd_stationary_covariance(h, noise_cov, lr)
    g = np.eye(h.shape[0]) - lr * h
    total, power = window * s, np.eye(h.shape[0])
    for lag in range(1, window):
        power = power @ g
        cross = power @ s
        total = total + (window - lag) * (cross + cross.T)
    return total / window**2
