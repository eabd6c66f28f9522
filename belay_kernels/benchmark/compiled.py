"""The torch.compile peer: each op's formula as the plain torch code a user would write
(``lerp``, ``where``, and a ``sum`` for the skipped count), compiled by Inductor into one
fused loop (C++ on the CPU, Triton on CUDA), run on the same flat operands as our ops.

Two variants of the ops that skip non-finite weights: ``torch.compile`` counts the skipped
elements, the same work as ours; ``torch.compile (uncounted)`` only skips them.
The swap compiles the reference's own code (an exchange, or for bf16 weights with an fp32
shadow the exact bit packing), since that code is the formula; so does any op of the method
table without a formula here.
"""

from __future__ import annotations

import functools
import time

import torch

from .. import reference
from ..methods import BY_NAME, METHODS, NAMES, Method
from .flat_cases import step_calls
from .peers import Unsupported, one_phrase

COUNTED = "torch.compile"
UNCOUNTED = "torch.compile (uncounted)"
# peer name -> the methods it has
COMPILED_PEERS = {
    COUNTED: NAMES,
    UNCOUNTED: tuple(m.name for m in METHODS if m.counts_skipped),
}


def _shadow_update(shadow, weights, rate, skipped, math, counted):
    s, w = shadow.to(math), weights.to(math)
    keep = ~torch.isfinite(w)
    shadow.copy_(torch.where(keep, s, torch.lerp(s, w, rate)))
    if counted:
        skipped.add_(keep.sum())


def _belay(weights, shadow, alpha, beta, skipped, math, counted):
    w, s = weights.to(math), shadow.to(math)
    keep = ~torch.isfinite(w)
    new_shadow = torch.where(keep, s, torch.lerp(s, w, alpha))
    weights.copy_(torch.lerp(w, s, beta))
    shadow.copy_(new_shadow)
    if counted:
        skipped.add_(keep.sum())


def _two_point(out, weights, snapshot, skipped, math, counted):
    out.copy_((weights.to(math) + snapshot.to(math)) * 0.5)


def _swap(weights, shadow, inverse, skipped, math, counted):
    reference.swap_(weights, shadow, inverse)


# The obvious torch code of the original ops. Each takes the method table's tensors in
# order, its scalars (as _HOST_SCALARS turns them into rates, on the host), the counter,
# the math dtype and whether to count.
_FORMULAS = {
    "ema": _shadow_update,
    "swa": _shadow_update,
    "belay": _belay,
    "two_point": _two_point,
    "swap": _swap,
}
_HOST_SCALARS = {
    "ema": lambda decay: (reference.one_minus(decay),),
    "swa": lambda count: (1 / (count + 1),),
}


def _reference_formula(method: Method):
    """Any other op: its reference, whose torch code is the formula."""
    op = getattr(reference, method.op)

    def formula(*args):
        *arguments, skipped, math, counted = args
        if method.counts_skipped:
            return op(*arguments, True, skipped if counted else None)
        return op(*arguments)

    return formula


_compiled = {}


def _compiled_formula(method: str):
    # one wrapper per formula: dynamo keeps its compiled code per function
    if method not in _compiled:
        formula = _FORMULAS.get(method) or _reference_formula(BY_NAME[method])
        _compiled[method] = torch.compile(formula, fullgraph=True, dynamic=False)
    return _compiled[method]


def _calls(method: str, t: dict) -> tuple[tuple, list[tuple]]:
    """The tensors of one timed step, by the table's order, and each call's scalars."""
    m = BY_NAME[method]
    tensors = tuple(t[role] for role in m.tensors)
    return tensors, [tuple(c.values()) for c in step_calls(method)]


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
    tensors, calls = _calls(method, t)
    host = _HOST_SCALARS.get(method)
    calls = [host(*scalars) for scalars in calls] if host else calls

    def step():  # a swap's step is as ours: in, then back
        for scalars in calls:
            fn(*tensors, *scalars, skipped, math, counted)

    return step


def reference_calls(method: str, t: dict, skipped: torch.Tensor | None = None) -> list:
    """The reference's op calls making one timed step of ``method``, each a callable."""
    m = BY_NAME[method]
    op = getattr(reference, m.op)
    tensors, calls = _calls(method, t)
    counter = (True, skipped) if m.counts_skipped else ()
    return [functools.partial(op, *tensors, *scalars, *counter) for scalars in calls]


def reference_step(method: str, t: dict, skipped: torch.Tensor | None = None) -> None:
    """What one timed step of ``method`` does, by the reference."""
    for call in reference_calls(method, t, skipped):
        call()


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
