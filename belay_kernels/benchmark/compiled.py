"""The torch.compile peer: each op's formula as the plain torch code a user would write
(``lerp``, ``where``, and a ``sum`` for the skipped count), compiled by Inductor into one
fused loop (C++ on the CPU, Triton on CUDA), run on the same flat operands as our ops.

Two variants of the ops that skip non-finite weights: ``torch.compile`` counts the skipped
elements, the same work as ours; ``torch.compile (uncounted)`` only skips them.
The swap compiles the reference's own code (an exchange, or for bf16 weights with an fp32
shadow the exact bit packing), since that code is the formula.
"""

from __future__ import annotations

import time

import torch

from .. import reference
from ..methods import METHODS, NAMES
from .flat_cases import BELAY_ALPHA, BELAY_BETA, DECAY, SWA_COUNT
from .peers import Unsupported, one_phrase

COUNTED = "torch.compile"
UNCOUNTED = "torch.compile (uncounted)"
# peer name -> the methods it has
COMPILED_PEERS = {
    COUNTED: NAMES,
    UNCOUNTED: tuple(m.name for m in METHODS if m.counts_skipped),
}


def _shadow_update(shadow, weights, skipped, rate, math, counted):
    s, w = shadow.to(math), weights.to(math)
    keep = ~torch.isfinite(w)
    shadow.copy_(torch.where(keep, s, torch.lerp(s, w, rate)))
    if counted:
        skipped.add_(keep.sum())


def _belay(weights, shadow, skipped, alpha, beta, math, counted):
    w, s = weights.to(math), shadow.to(math)
    keep = ~torch.isfinite(w)
    new_shadow = torch.where(keep, s, torch.lerp(s, w, alpha))
    weights.copy_(torch.lerp(w, s, beta))
    shadow.copy_(new_shadow)
    if counted:
        skipped.add_(keep.sum())


def _two_point(out, weights, snapshot, math):
    out.copy_((weights.to(math) + snapshot.to(math)) * 0.5)


_FORMULAS = {
    "ema": _shadow_update,
    "swa": _shadow_update,
    "belay": _belay,
    "two_point": _two_point,
    "swap": reference.swap_,
}
_compiled = {}


def _compiled_formula(method: str):
    # one wrapper per formula: dynamo keeps its compiled code per function
    if method not in _compiled:
        _compiled[method] = torch.compile(_FORMULAS[method], fullgraph=True, dynamic=False)
    return _compiled[method]


def compiled_step(peer: str, method: str, t: dict, skipped: torch.Tensor | None = None):
    """One timed step of ``peer`` on operands ``t`` (by role, as flat_cases makes them);
    ``skipped`` is the int64 counter the counted variant adds to."""
    if method not in COMPILED_PEERS[peer]:
        raise Unsupported(f"{peer} has no {method}")
    fn = _compiled_formula(method)
    math = reference.opmath_dtype(*t.values())
    counted = peer == COUNTED
    if skipped is None:
        skipped = torch.zeros((), dtype=torch.int64, device=next(iter(t.values())).device)
    if method == "ema":
        rate = reference.one_minus(DECAY)
        return lambda: fn(t["shadow"], t["weights"], skipped, rate, math, counted)
    if method == "swa":
        rate = 1 / (SWA_COUNT + 1)
        return lambda: fn(t["shadow"], t["weights"], skipped, rate, math, counted)
    if method == "belay":
        return lambda: fn(
            t["weights"], t["shadow"], skipped, BELAY_ALPHA, BELAY_BETA, math, counted
        )
    if method == "two_point":
        return lambda: fn(t["out"], t["weights"], t["snapshot"], math)

    def round_trip():  # as our timed swap: in, then back
        fn(t["weights"], t["shadow"], False)
        fn(t["weights"], t["shadow"], True)

    return round_trip


def reference_step(method: str, t: dict, skipped: torch.Tensor | None = None) -> None:
    """What one timed step of ``method`` does, by the reference."""
    if method == "ema":
        reference.ema_update_(t["shadow"], t["weights"], DECAY, True, skipped)
    elif method == "swa":
        reference.swa_update_(t["shadow"], t["weights"], SWA_COUNT, True, skipped)
    elif method == "belay":
        reference.belay_step_(t["weights"], t["shadow"], BELAY_ALPHA, BELAY_BETA, True, skipped)
    elif method == "two_point":
        reference.two_point_average_(t["out"], t["weights"], t["snapshot"])
    else:
        reference.swap_(t["weights"], t["shadow"])
        reference.swap_(t["weights"], t["shadow"], inverse=True)


def checked_first_call(step, method: str, t: dict, device: torch.device) -> float:
    """:func:`first_call`, then the result against the reference: a peer that computes
    something else is not timed (Inductor 2.14 miscompiles the same-dtype exchange)."""
    expected = {role: tensor.clone() for role, tensor in t.items()}
    seconds = first_call(step, device)
    reference_step(method, expected)
    for role, tensor in t.items():
        if not torch.allclose(
            tensor.double(), expected[role].double(), rtol=2e-2, atol=1e-5, equal_nan=True
        ):
            raise Unsupported(f"torch.compile's result differs from the reference ({role})")
    return seconds


def first_call(step, device: torch.device) -> float:
    """Seconds of a compiled step's first call (tracing, code generation and the C++ or
    Triton compile, or a load from Inductor's on-disk cache); raises Unsupported where
    torch.compile cannot run here."""
    started = time.perf_counter()
    try:
        step()
    except Exception as exc:  # no C++ compiler, no Triton, an unsupported op...
        raise Unsupported(f"torch.compile cannot run here: {one_phrase(exc)}") from exc
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def fresh_compile() -> None:
    """Forget the compiled code, so each benchmark point compiles for its own shape and
    dtypes (dynamo keeps a few shapes per function, then falls back to eager)."""
    torch.compiler.reset()
