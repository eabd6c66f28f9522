"""The synthetic training problems the Sandler and OU experiments share.

``LinearRegressionBatches`` is eq. 5 of Sandler et al.: per-sample loss
``(a . theta + c)^2 / 2`` with ``a ~ N(0, I_d)`` and ``c ~ N(0, sigma^2)``, so
``E[A_x^T A_x] = I`` (Lemma 1's assumption) and the minimum of the full loss is at 0.
A batch of ``B`` samples has gradient ``H_x theta + b_x`` with ``H_x = mean(a a^T)`` and
``b_x = mean(a c)``; the noise at the minimum has ``E||b_x||^2 = d sigma^2 / B``.
Many independent runs are the rows of one ``(runs, d)`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    hessian: torch.Tensor  # (runs, d, d)
    offset: torch.Tensor  # (runs, d)

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.hessian, theta.unsqueeze(-1)).squeeze(-1) + self.offset


@dataclass
class LinearRegressionBatches:
    dim: int
    batch_size: int
    sigma: float = 1.0

    def noise_norm(self) -> float:
        """``||c|| = sqrt(E||b_x||^2)``, the noise scale in eq. 13."""
        return (self.dim * self.sigma**2 / self.batch_size) ** 0.5

    def sample(self, runs: int, gen: torch.Generator, dtype=torch.float64) -> Batch:
        a = torch.randn(runs, self.batch_size, self.dim, generator=gen, dtype=dtype)
        c = self.sigma * torch.randn(runs, self.batch_size, 1, generator=gen, dtype=dtype)
        hessian = torch.einsum("rbi,rbj->rij", a, a) / self.batch_size
        return Batch(hessian, (a * c).mean(dim=1))


def sgd_step_(theta: torch.Tensor, gradient: torch.Tensor, lr) -> None:
    """``theta <- theta - lr * gradient``; ``lr`` a number or a per-row column."""
    theta.sub_(gradient * lr)
