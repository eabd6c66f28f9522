"""Experimental, Triton-only: device-side step counters, the state that lets a whole
averaging ``step()`` run with no host synchronisation, and so be captured in a CUDA graph.

Neither :mod:`belay_kernels.ops` nor the averagers reach this module: it is for code that
calls the Triton kernels of :mod:`belay_kernels.backend.triton` directly, and its interface may
change. The averagers follow a decay schedule on the host instead.

A :class:`StepGate` holds two device tensors:

- ``step``: int64, one element, the number of optimizer steps taken so far (counting
  from 0, skipped steps excluded). The kernels read it; :func:`advance_step_` adds one.
- ``skip`` (optional): any one-element tensor that the training step writes in place
  every step, e.g. a flag your loop sets from the optimizer's overflow check. Nonzero
  makes every gated kernel, and ``advance_step_``, a no-op on the device. A captured
  graph reads the tensor it was captured with, so the flag must be that same tensor on
  every step: ``torch.amp.GradScaler``'s ``found_inf`` is not, since ``unscale_`` makes
  a new one each step (copy it into your flag with ``flag.copy_(...)`` instead).

and two host constants, ``start`` and ``every``. At step ``t`` a gated kernel runs when
``skip == 0``, ``t >= start`` and ``(t - start) % every == 0``; it is then the update
number ``k = (t - start) // every`` (0 for the first). From ``k`` the kernels compute:

- SWA: the count of models already in the shadow, ``count + k`` (``count`` being what
  the shadow held before the first gated update, usually 0);
- EMA with a :class:`~belay_kernels.schedules.Warmup` as its decay: the schedule's
  ``decay_at(k)``, that is ``1 - (1 + k / gamma) ** -power`` clamped to
  ``[min_decay, decay]``, the same parameters and clamping as on the host, in float64.

One averaging step is then: the update kernels (one launch per flat buffer or tensor
list), then ``advance_step_(gate)`` (one tiny launch). Create the gate and run one
step before capturing, so that kernels are compiled and any pointer table is built
outside the capture::

    from belay_kernels.schedules import Warmup
    from belay_kernels.backend.triton import StepGate, advance_step_, ema_update_foreach_

    found_inf = torch.zeros(1, device="cuda")      # one tensor, written in place each step
    gate = StepGate.on("cuda", skip=found_inf, start=0, every=1)

    def average():
        ema_update_foreach_(shadows, params, Warmup(decay=0.999), gate=gate)
        advance_step_(gate)

    average()                                      # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        average()
    graph.replay()                                 # every later step: no host sync

The update functions take the gate as a keyword-only argument after the backend
contract's positional ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import on_device


@dataclass(frozen=True)
class StepGate:
    step: torch.Tensor
    skip: torch.Tensor | None = None
    start: int = 0
    every: int = 1

    @classmethod
    def on(cls, device, *, skip=None, start: int = 0, every: int = 1) -> StepGate:
        """A gate at step 0 on ``device``."""
        step = torch.zeros(1, dtype=torch.int64, device=device)
        return cls(step, skip, start, every)


@triton.jit
def _gate(step_ptr, skip_ptr, start, every, HAS_STEP: tl.constexpr, HAS_SKIP: tl.constexpr):
    """(whether this step updates, the update number k) read from the device."""
    active = tl.full([], 1, tl.int1)
    k = tl.full([], 0, tl.int64)
    if HAS_SKIP:
        active = tl.load(skip_ptr) == 0
    if HAS_STEP:
        since = tl.load(step_ptr) - start
        active = active & (since >= 0) & (since % every == 0)
        k = tl.maximum(since, 0) // every
    return active, k


@triton.jit
def _warmup_weight(k, gamma, power, min_decay, decay, COMPUTE: tl.constexpr):
    """The weight ``1 - decay_at(k)`` of schedules.Warmup, in float64 (fp32 division, exp2
    and log2 are approximate on a GPU) and rounded once to COMPUTE, as the reference
    rounds ``1 - decay``; ``power == 1`` is an IEEE division, as on the host."""
    base = 1 + k.to(tl.float64) / gamma
    powered = tl.where(power == 1, 1 / base, tl.exp2(-power * tl.log2(base)))
    raw = 1 - powered
    return (1 - tl.minimum(tl.maximum(raw, min_decay), decay)).to(COMPUTE)


@triton.jit
def _advance_step_kernel(step_ptr, skip_ptr, HAS_SKIP: tl.constexpr):
    step = tl.load(step_ptr)
    if HAS_SKIP:
        step += (tl.load(skip_ptr) == 0).to(tl.int64)
    else:
        step += 1
    tl.store(step_ptr, step)


def advance_step_(gate: StepGate) -> None:
    """``gate.step += 1`` on the device, unless ``gate.skip`` is nonzero."""
    skip = gate.skip if gate.skip is not None else gate.step
    with on_device(gate.step.device):
        _advance_step_kernel[(1,)](gate.step, skip, HAS_SKIP=gate.skip is not None, num_warps=1)


def gate_args(gate: StepGate | None, placeholder: torch.Tensor) -> tuple:
    """The kernels' gate arguments: step, skip, start, every, HAS_STEP, HAS_SKIP."""
    if gate is None:
        return (placeholder, placeholder, 0, 1), {"HAS_STEP": False, "HAS_SKIP": False}
    skip = gate.skip if gate.skip is not None else placeholder
    return (gate.step, skip, gate.start, gate.every), {
        "HAS_STEP": True,
        "HAS_SKIP": gate.skip is not None,
    }
