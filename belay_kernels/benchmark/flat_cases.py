"""Our ops on flat tensors, one backend at a time: the steps the size sweep times.

Hyperparameters are typical values; they do not change the memory traffic.
"""

from __future__ import annotations

import torch

from .. import ops
from .._backends import _load
from .traffic import TRAFFIC, operand_dtype

DECAY = 0.999
SWA_COUNT = 7
BELAY_ALPHA = 0.001
BELAY_BETA = 0.01


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


def our_step(method: str, backend: str, t: dict):
    """A callable running one timed step of ``method`` on operands ``t`` via ``backend``."""
    if method == "ema":
        return lambda: ops.ema_update_(t["shadow"], t["weights"], decay=DECAY, backend=backend)
    if method == "swa":
        return lambda: ops.swa_update_(t["shadow"], t["weights"], count=SWA_COUNT, backend=backend)
    if method == "belay":
        return lambda: ops.belay_step_(
            t["weights"], t["shadow"], alpha=BELAY_ALPHA, beta=BELAY_BETA, backend=backend
        )
    if method == "two_point":
        return lambda: ops.two_point_average(
            t["weights"], t["snapshot"], out=t["out"], backend=backend
        )
    if method == "swap":

        def round_trip():
            ops.swap_(t["weights"], t["shadow"], backend=backend)
            ops.swap_(t["weights"], t["shadow"], inverse=True, backend=backend)

        return round_trip
    raise ValueError(f"unknown method {method!r}")


def backend_supports(method, backend, weights_dtype, shadow_dtype, device) -> str:
    """Empty when ``backend`` runs ``method`` for this dtype pair, else the reason."""
    operands = make_operands(method, 3, weights_dtype, shadow_dtype, device)
    try:
        our_step(method, backend, operands)()
    except Exception as exc:  # the op's own message says why
        return f"{type(exc).__name__}: {exc}"
    return ""
