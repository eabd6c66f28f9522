"""Our ops on flat tensors, one backend at a time: the steps the size sweep times.

Hyperparameters are typical values; they do not change the memory traffic.
"""

from __future__ import annotations

import torch

from .. import ops
from .._backends import _load
from ..methods import BY_NAME
from .traffic import TRAFFIC, operand_dtype


def typical(method: str, scalar: str):
    """The method table's typical value of one scalar argument."""
    return next(s.typical for s in BY_NAME[method].scalars if s.name == scalar)


DECAY = typical("ema", "decay")
SWA_COUNT = typical("swa", "count")
BELAY_ALPHA = typical("belay", "alpha")
BELAY_BETA = typical("belay", "beta")


def available_backends(device: torch.device) -> list[str]:
    """Backends that load here and run on ``device``'s type, in registry order."""
    from .. import backends

    names = []
    for name in backends():
        status = _load(name)
        if status.available and device.type in status.module.DEVICE_TYPES:
            names.append(name)
    return names


def make_operands(method, numel, weights_dtype, shadow_dtype, device):
    """Fresh operands of ``method``, by operand name: uniform in [-1, 1), drawn on the
    device (the timing does not depend on the values, and the sweep builds thousands)."""
    reads, writes = TRAFFIC[method]
    return {
        name: torch.empty(
            numel, dtype=operand_dtype(name, weights_dtype, shadow_dtype), device=device
        ).uniform_(-1, 1)
        for name in dict.fromkeys(reads + writes)
    }


def step_calls(method: str) -> list[dict]:
    """The scalar arguments of each op call in one timed step: the typical values, and a
    flag (swap's ``inverse``) taking each value in turn, as ``averaged()`` swaps in and back."""
    scalars = BY_NAME[method].scalars
    values = {s.name: s.typical for s in scalars if s.kind != "flag"}
    flags = [s.name for s in scalars if s.kind == "flag"]
    if not flags:
        return [values]
    return [dict(values, **dict.fromkeys(flags, flag)) for flag in (False, True)]


def our_step(method: str, backend: str, t: dict):
    """A callable running one timed step of ``method`` on operands ``t`` via ``backend``."""
    m = BY_NAME[method]
    fn = getattr(ops, m.function)
    tensors = {role: t[role] for role in m.tensors}
    calls = step_calls(method)

    def step():
        for scalars in calls:
            fn(**tensors, **scalars, backend=backend)

    return step


def backend_supports(method, backend, weights_dtype, shadow_dtype, device) -> str:
    """Empty when ``backend`` runs ``method`` for this dtype pair, else the reason."""
    operands = make_operands(method, 3, weights_dtype, shadow_dtype, device)
    try:
        our_step(method, backend, operands)()
    except Exception as exc:  # the op's own message says why
        return f"{type(exc).__name__}: {exc}"
    return ""
