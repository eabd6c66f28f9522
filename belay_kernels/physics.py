"""The full damped two-mass system behind BELAY, with a velocity for each particle.

A reference for experiments, not a fused kernel. The model's weights ``w1`` (mass ``m1``)
and the shadow ``w2`` (mass ``m2``) are joined by a zero-length spring ``k``; damping
``c1``, ``c2``; only ``w1`` feels the optimizer. One unit time step of the poster's
kinematic discretisation, in the post-step form the library uses (the optimizer has
already moved ``w1`` to ``w1*``):

    w1' = w1* + beta  (w2 - w1*) + (1 - c1 / (2 m1)) v1
    w2' = w2  + alpha (w1* - w2) + (1 - c2 / (2 m2)) v2
    v1  = w1' - w1,   v2 = w2' - w2          (backward differences: momentum buffers)

with ``alpha = k / (2 m2)``, ``beta = k / (2 m1)``. The velocity of ``w1`` includes the
optimizer's own displacement, so ``1 - c1 / (2 m1)`` acts as a heavy-ball momentum
coefficient. At the poster's "critical" damping ``c = 2 m`` both velocity coefficients are
exactly 0 and a step is exactly :func:`belay_kernels.ops.belay_step_`, bit for bit: the
spring part *is* that op, and adding ``0 * v`` changes no finite value.

Note the discrete scheme is stable only for ``0 < c / (2 m) < 2`` (momentum coefficient in
(-1, 1)); the physically critical damping of the spring, ``2 sqrt(k m)``, is another number.
"""

from __future__ import annotations

import torch

from . import ops


def damping_ratio(c: float, m: float) -> float:
    """``c / (2 m)``: 1 is the poster's choice, below 1 under-damped, above over-damped."""
    return c / (2.0 * m)


class DampedTwoMass:
    """Two particles per parameter; ``step()`` runs after ``optimizer.step()``.

    ``c1`` and ``c2`` default to ``2 m1`` and ``2 m2`` (BELAY). They may also be tensors
    that broadcast against the parameters (one damping per row, to sweep many at once).
    """

    def __init__(self, params, *, k: float, m1: float, m2: float, c1=None, c2=None):
        self.params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        self.alpha, self.beta = k / (2.0 * m2), k / (2.0 * m1)
        c1 = 2.0 * m1 if c1 is None else c1
        c2 = 2.0 * m2 if c2 is None else c2
        self.carry1 = 1.0 - c1 / (2.0 * m1)  # velocity coefficient of the model
        self.carry2 = 1.0 - c2 / (2.0 * m2)  # velocity coefficient of the shadow
        with torch.no_grad():
            self.shadows = [p.detach().clone() for p in self.params]
            self.positions = [p.detach().clone() for p in self.params]  # w1 after last step
            self.velocities1 = [torch.zeros_like(p) for p in self.params]
            self.velocities2 = [torch.zeros_like(p) for p in self.params]

    def shadow_params(self) -> list[torch.Tensor]:
        return self.shadows

    @torch.no_grad()
    def step(self) -> None:
        for w1, w2, x1, v1, v2 in zip(
            self.params, self.shadows, self.positions, self.velocities1, self.velocities2
        ):
            w2_before = w2.clone()
            ops.belay_step_(w1.data, w2, alpha=self.alpha, beta=self.beta)
            w1.data.add_(v1 * self.carry1)
            w2.add_(v2 * self.carry2)
            torch.sub(w1.data, x1, out=v1)
            torch.sub(w2, w2_before, out=v2)
            x1.copy_(w1.data)


def linear_step_matrix(
    curvature_times_lr: float, *, alpha: float, beta: float, zeta1: float, zeta2: float
):
    """The step of :class:`DampedTwoMass` after an SGD step on ``f = h w^2 / 2``, as a
    matrix on the state ``(w1, w2, v1, v2)`` (``curvature_times_lr = lr h``; ``zeta = c /
    (2 m)``). Its spectral radius below 1 means the noiseless system converges, at that rate."""
    import numpy as np

    g = 1.0 - curvature_times_lr  # the SGD step: w1* = g w1
    r1, r2 = 1.0 - zeta1, 1.0 - zeta2
    w1_next = [(1 - beta) * g, beta, r1, 0.0]
    w2_next = [alpha * g, 1 - alpha, 0.0, r2]
    return np.array(
        [
            w1_next,
            w2_next,
            [w1_next[0] - 1.0, w1_next[1], r1, 0.0],
            [w2_next[0], w2_next[1] - 1.0, 0.0, r2],
        ]
    )
