"""2-D test functions with additive gradient noise, and a runner that trains many small
"arms" (optimizer, learning rate, averaging method) at once.

Each arm's seeds are rows of a parameter tensor. Arms that share an averager setting
share one tensor, one library averager over it and one :class:`RowOptimizer` (SGD or Adam
with a learning rate per row), so a step is a handful of calls however many learning
rates and optimizers there are. Gradients come from autograd on one
concatenated copy of all parameters, plus Gaussian noise (a stand-in for minibatches).

A run that leaves the box ``|x| < DIVERGED`` is marked diverged; its weights are clamped
to ``+-CLAMP`` so the arithmetic of the other rows stays finite.

Method ``"belay"`` is the library's default (post-step) BELAY, stepped after the
:class:`RowOptimizer`. Method ``"poster"`` is BELAY as the poster writes it
(``Belay(form="poster")``), which only a fused step can run: those arms train with
``torch.optim.SGD`` or ``torch.optim.Adam`` (the same algorithms as :class:`RowOptimizer`,
one param group per learning rate) fused with the averager by :func:`belay_kernels.fuse`,
on tensors of their own. A poster arm sees the same gradient noise as its post-step twin
(the ``"belay"`` arm with the same optimizer, lr, alpha and beta), and the other arms run
exactly as they would without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..averagers import EMA, Belay
from ..fused import fuse
from ._common import parameter

DIVERGED, CLAMP = 100.0, 1e3
METHODS = ("none", "ema", "belay", "poster")
# a poster arm without a post-step twin draws its noise from a generator of its own,
# seeded with the run's seed plus this
_UNTWINNED_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TestFunction:
    name: str
    value: Callable[[torch.Tensor], torch.Tensor]  # (N, 2) -> (N,)
    start: tuple[float, float]
    minimum: float  # the global minimum value
    threshold: float  # converged: f - minimum below this

    def gap(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) - self.minimum

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value(x).sum(), x)
        return grad


def _rosenbrock(x):
    return (1 - x[:, 0]) ** 2 + 100 * (x[:, 1] - x[:, 0] ** 2) ** 2


def _beale(x):
    a, b = x[:, 0], x[:, 1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def _booth(x):
    return (x[:, 0] + 2 * x[:, 1] - 7) ** 2 + (2 * x[:, 0] + x[:, 1] - 5) ** 2


def _himmelblau(x):
    return (x[:, 0] ** 2 + x[:, 1] - 11) ** 2 + (x[:, 0] + x[:, 1] ** 2 - 7) ** 2


def _rastrigin(x):
    return 20 + (x**2 - 10 * torch.cos(2 * math.pi * x)).sum(-1)


def _ackley(x):
    r = torch.sqrt(0.5 * (x**2).sum(-1) + 1e-12)  # the epsilon keeps the gradient finite at 0
    c = 0.5 * torch.cos(2 * math.pi * x).sum(-1)
    return -20 * torch.exp(-0.2 * r) - torch.exp(c) + math.e + 20


def _ill_conditioned(x):
    return 0.5 * (x[:, 0] ** 2 + 1000 * x[:, 1] ** 2)


ROSENBROCK = TestFunction("Rosenbrock", _rosenbrock, (-1.5, 2.0), 0.0, 1e-2)
FUNCTIONS = (
    ROSENBROCK,
    TestFunction("Beale", _beale, (1.0, 1.5), 0.0, 1e-2),
    TestFunction("Booth", _booth, (-5.0, 5.0), 0.0, 1e-2),
    TestFunction("Himmelblau", _himmelblau, (0.0, -4.0), 0.0, 1e-2),
    TestFunction("Rastrigin", _rastrigin, (0.45, -0.3), 0.0, 1e-1),
    TestFunction("Ackley", _ackley, (0.6, -0.6), 0.0, 1e-1),
    TestFunction("quadratic (cond. 1000)", _ill_conditioned, (3.0, 1.0), 0.0, 1e-2),
)


@dataclass(frozen=True)
class Arm:
    optimizer: str  # "sgd" or "adam"
    lr: float
    method: str = "none"  # "none", "ema", "belay" (post-step) or "poster" (fused)
    alpha: float = 0.0  # EMA: decay = 1 - alpha; BELAY: the shadow's rate
    beta: float = 0.0  # BELAY: the spring's pull on the model

    def label(self) -> str:
        if self.method == "none":
            return "no averaging"
        if self.method == "ema":
            return f"EMA a={self.alpha:g}"
        if self.method == "poster":
            return f"BELAY poster a={self.alpha:g} b={self.beta:g}"
        return f"BELAY a={self.alpha:g} b={self.beta:g}"

    def twin(self) -> Arm:
        """The post-step arm a poster arm is paired with (same noise)."""
        return Arm(self.optimizer, self.lr, "belay", self.alpha, self.beta)


@dataclass
class ArmResults:
    arms: list[Arm]
    evaluated: np.ndarray  # (arms, seeds, records): f - min at the evaluated weights
    live: np.ndarray  # same, at the live weights
    diverged: np.ndarray  # (arms, seeds) bool
    record_steps: np.ndarray
    final_live: torch.Tensor  # (arms, seeds, 2) weights at the end
    final_evaluated: torch.Tensor  # same, the evaluated weights


def _make_averager(method, params, alpha, beta):
    if method == "ema":
        return EMA(params, decay=1.0 - alpha)
    if method == "belay":
        return Belay(params, alpha=alpha, beta=beta)
    return None


class RowOptimizer:
    """SGD or Adam (torch's defaults: betas 0.9, 0.999, eps 1e-8) with one learning rate
    and one choice of algorithm per row, so arms with different settings share a tensor."""

    def __init__(
        self,
        param: torch.Tensor,
        lrs: torch.Tensor,
        adam: torch.Tensor,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.param, self.lrs, self.adam = param, lrs.unsqueeze(1), adam.unsqueeze(1)
        self.betas, self.eps, self.steps = betas, eps, 0
        self.first = torch.zeros_like(param)
        self.second = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.steps += 1
        self.first.lerp_(grad, 1 - b1)
        self.second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.first / (1 - b1**self.steps)
        v_hat = self.second / (1 - b2**self.steps)
        direction = torch.where(self.adam, m_hat / (v_hat.sqrt() + self.eps), grad)
        self.param.data.sub_(self.lrs * direction)


def run_arms(
    function: TestFunction,
    arms: list[Arm],
    *,
    seeds: int,
    steps: int,
    noise: float,
    gen: torch.Generator,
    record_every: int = 10,
    make_averager=_make_averager,
) -> ArmResults:
    """Train every arm for ``steps`` steps from ``function.start`` (``seeds`` rows each).
    ``make_averager`` builds the averagers of every arm but the ``"poster"`` ones."""
    base = [i for i, arm in enumerate(arms) if arm.method != "poster"]
    groups: dict[tuple, list[int]] = {}
    for i in base:
        arm = arms[i]
        groups.setdefault((arm.method, arm.alpha, arm.beta), []).append(i)
    order = [i for idx in groups.values() for i in idx]  # arm index of each block of rows
    trainers = []  # (param, optimizer, averager or None)
    for (method, alpha, beta), idx in groups.items():
        start = torch.tensor(function.start, dtype=torch.float64).expand(len(idx) * seeds, 2)
        param = parameter(start)
        per_row = lambda values: torch.tensor(values, dtype=torch.float64).repeat_interleave(seeds)
        optimizer = RowOptimizer(
            param,
            per_row([arms[i].lr for i in idx]),
            per_row([arms[i].optimizer == "adam" for i in idx]).bool(),
        )
        trainers.append((param, optimizer, make_averager(method, [param], alpha, beta)))
    evaluated_views = [a.shadow_params()[0] if a is not None else p for p, _, a in trainers]
    data = [p.data for p, _, _ in trainers]
    poster = _PosterArms(function, arms, order, seeds, gen)
    records = steps // record_every
    evaluated = np.zeros((len(arms), seeds, records))
    live = np.zeros_like(evaluated)
    diverged = np.zeros((len(arms), seeds), dtype=bool)
    sizes = [len(d) for d in data]

    def record(r, index, ev, xs):
        evaluated[index, :, r] = function.gap(ev).reshape(len(index), seeds).numpy()
        live[index, :, r] = function.gap(xs).reshape(len(index), seeds).numpy()
        far = (xs.abs().amax(-1) > DIVERGED) | (ev.abs().amax(-1) > DIVERGED)
        far |= ~torch.isfinite(xs).all(-1)
        diverged[index] |= far.reshape(len(index), seeds).numpy()

    for step in range(steps):
        if data:
            x = torch.cat(data)
            grad = function.gradient(x)
            draw = noise * torch.randn(grad.shape, generator=gen, dtype=grad.dtype)
            grad += draw
            for (_, optimizer, averager), g in zip(trainers, grad.split(sizes)):
                optimizer.step(g)
                if averager is not None:
                    averager.step()
            torch._foreach_clamp_min_(data, -CLAMP)
            torch._foreach_clamp_max_(data, CLAMP)
        else:
            draw = None
        poster.step(draw, noise)
        if (step + 1) % record_every == 0:
            r = (step + 1) // record_every - 1
            with torch.no_grad():
                if data:
                    record(r, order, torch.cat(evaluated_views), torch.cat(data))
                if poster.order:
                    record(r, poster.order, *poster.weights())
    final_live = torch.zeros(len(arms), seeds, 2, dtype=torch.float64)
    final_evaluated = torch.zeros_like(final_live)
    if data:
        final_live[order] = torch.cat(data).reshape(len(order), seeds, 2)
        final_evaluated[order] = torch.cat(evaluated_views).reshape(len(order), seeds, 2)
    if poster.order:
        shadows, weights = poster.weights()
        final_live[poster.order] = weights.reshape(len(poster.order), seeds, 2)
        final_evaluated[poster.order] = shadows.reshape(len(poster.order), seeds, 2)
    return ArmResults(
        arms,
        evaluated,
        live,
        diverged,
        record_every * np.arange(1, records + 1),
        final_live,
        final_evaluated,
    )


class _PosterArms:
    """The ``"poster"`` arms of a run: per (optimizer, alpha, beta) one
    ``fuse(torch.optim.SGD or Adam, Belay(form="poster"))`` over one (seeds, 2) tensor per
    arm, with one param group (learning rate) per arm. Gradients come from their own
    autograd call; the noise of each arm is its post-step twin's rows of the run's draw."""

    def __init__(self, function, arms, base_order, seeds, gen):
        self.function, self.seeds = function, seeds
        groups: dict[tuple, list[int]] = {}
        for i, arm in enumerate(arms):
            if arm.method == "poster":
                groups.setdefault((arm.optimizer, arm.alpha, arm.beta), []).append(i)
        self.order = [i for idx in groups.values() for i in idx]
        start = torch.tensor(function.start, dtype=torch.float64).expand(seeds, 2)
        self.params, self.shadows, self.optimizers = [], [], []
        for (opt, alpha, beta), idx in groups.items():
            params = [parameter(start) for _ in idx]
            param_groups = [{"params": [p], "lr": arms[i].lr} for p, i in zip(params, idx)]
            # torch's defaults, as RowOptimizer's: Adam betas (0.9, 0.999), eps 1e-8
            optimizer = (torch.optim.SGD if opt == "sgd" else torch.optim.Adam)(
                param_groups, lr=arms[idx[0]].lr
            )
            belay = Belay(params, alpha=alpha, beta=beta, form="poster")
            self.optimizers.append(fuse(optimizer, belay))
            self.params += params
            self.shadows += belay.shadow_params()
        # the rows of the run's noise each arm takes: its twin's block (None: no twin)
        block = {arms[i]: k for k, i in enumerate(base_order) if arms[i].method == "belay"}
        twins = [block.get(arms[i].twin()) for i in self.order]
        self.twinned = torch.tensor([k is not None for k in twins]).repeat_interleave(seeds)
        self.rows = torch.cat(
            [torch.arange(k * seeds, (k + 1) * seeds) for k in twins if k is not None]
            or [torch.zeros(0, dtype=torch.long)]
        )
        self.own = None
        if not self.twinned.all():
            self.own = torch.Generator().manual_seed(gen.initial_seed() + _UNTWINNED_SEED_OFFSET)

    def step(self, draw, noise) -> None:
        if not self.order:
            return
        x = torch.cat([p.data for p in self.params])
        grad = self.function.gradient(x)
        if self.twinned.any():
            grad[self.twinned] += draw[self.rows]
        if self.own is not None:
            rest = (~self.twinned).sum().item()
            grad[~self.twinned] += noise * torch.randn(
                rest, 2, generator=self.own, dtype=grad.dtype
            )
        for p, g in zip(self.params, grad.split(self.seeds)):
            p.grad = g
        for optimizer in self.optimizers:
            optimizer.step()
        data = [p.data for p in self.params]
        torch._foreach_clamp_min_(data, -CLAMP)
        torch._foreach_clamp_max_(data, CLAMP)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the shadows, the live weights), the rows of ``order``'s arms."""
        return torch.cat(self.shadows), torch.cat([p.data for p in self.params])
