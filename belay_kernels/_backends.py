"""Which backends exist, which are usable here, and which one an op runs on.

A backend is a module that implements the reference's functions with the same
positional signatures (see :mod:`belay_kernels.reference`), one per op of the method
table (:mod:`belay_kernels.methods`): the tensors, the scalars, then ``skip_nonfinite,
skipped`` for an op that counts skipped elements, for example
``ema_update_(shadow, weights, decay, skip_nonfinite, skipped)``; and it declares
``DEVICE_TYPES`` (the tensor device types it runs on). Optionally it has
``unavailable_reason()`` (a string when it cannot run on this machine), ``supports(op,
dtypes)`` (False sends ``auto`` to the next backend), ``REQUIRES_CONTIGUOUS`` and
foreach variants that take lists of tensors in one launch, named as
:mod:`belay_kernels.methods` names them (``ema_update_foreach_(shadows, weights, decay, skip_nonfinite,
skipped)``, ``swap_foreach_(weights, shadows, inverse)``, ...).

Compiled backends are optional: an import error is kept and reported by
:func:`backends`, and surfaces only when that backend is asked for by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ._checks import BelayInputError

# name -> module implementing it
_MODULES = {
    "torch": "belay_kernels.backend.torch",  # the reference's ops without full-size temporaries
    # the spec itself, out of place; never auto. It stays at the package's top level, not in
    # backend/: every backend, the ops and the averagers import it as the definition.
    "reference": "belay_kernels.reference",
    "inductor": "belay_kernels.backend.inductor",  # the reference through torch.compile; opt-in
    "cpp": "belay_kernels.backend.cpp",  # the compiled CPU kernels (csrc/)
    "cuda": "belay_kernels.backend.cuda",  # the compiled CUDA kernels (csrc/)
    "triton": "belay_kernels.backend.triton",
}

# What "auto" tries, per tensor device type, fastest first. A backend with
# ``faster_than_eager(op, device_type, dtypes)`` (inductor) is taken only where that says so.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "inductor", "torch"),
    "cpu": ("cpp", "inductor", "torch"),
}
_FALLBACK_ORDER = ("inductor", "torch")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    module: ModuleType | None
    reason: str  # why it is unavailable; empty when available

    @property
    def available(self) -> bool:
        return self.module is not None


_cache: dict[str, BackendStatus] = {}


def _load(name: str) -> BackendStatus:
    if name in _cache:
        return _cache[name]
    try:
        module = importlib.import_module(_MODULES[name])
        reason = getattr(module, "unavailable_reason", lambda: None)()
    except Exception as exc:  # keep the error, report it on demand
        module, reason = None, f"{type(exc).__name__}: {exc}"
    status = BackendStatus(name, module if not reason else None, reason or "")
    _cache[name] = status
    return status


def backends() -> dict[str, str]:
    """Every backend's status on this machine: 'available (devices)' or why not."""
    report = {}
    for name in _MODULES:
        status = _load(name)
        if status.available:
            devices = ", ".join(sorted(status.module.DEVICE_TYPES))
            usage = getattr(status.module, "usage", None)  # e.g. what compiling cost so far
            report[name] = f"available ({devices})" + (f"; {usage()}" if usage else "")
        else:
            report[name] = f"unavailable: {status.reason}"
    return report


def _usable(status: BackendStatus, op: str, device_type: str, dtypes, contiguous: bool) -> bool:
    module = status.module
    if module is None or device_type not in module.DEVICE_TYPES or not hasattr(module, op):
        return False
    if getattr(module, "REQUIRES_CONTIGUOUS", False) and not contiguous:
        return False
    supports = getattr(module, "supports", None)
    return supports is None or supports(op, dtypes)


def _auto_may_take(status: BackendStatus, op: str, device_type: str, dtypes) -> bool:
    verdict = getattr(status.module, "faster_than_eager", None)
    return verdict is None or verdict(op, device_type, tuple(dtypes))[0]


def check_name(backend: object) -> None:
    if backend != "auto" and backend not in _MODULES:
        raise BelayInputError(
            f"backend must be 'auto' or one of {sorted(_MODULES)}, got {backend!r}."
        )


def resolve(backend: str, op: str, device_type: str, dtypes, contiguous: bool) -> ModuleType:
    """The backend module that runs ``op`` on tensors of ``device_type`` and ``dtypes``."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, _FALLBACK_ORDER):
            status = _load(name)
            if _usable(status, op, device_type, dtypes, contiguous) and _auto_may_take(
                status, op, device_type, dtypes
            ):
                return status.module
        torch_backend = _load("torch").module
        return torch_backend if hasattr(torch_backend, op) else _load("reference").module
    check_name(backend)
    status = _load(backend)
    if not status.available:
        raise BelayInputError(
            f"backend {backend!r} is unavailable: {status.reason}. "
            "Use backend='auto' to fall back, or see belay_kernels.backends()."
        )
    if not _usable(status, op, device_type, dtypes, contiguous):
        dtype_names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        layout = "" if contiguous else " non-contiguous"
        raise BelayInputError(
            f"backend {backend!r} cannot run {op} on{layout} {device_type} tensors of "
            f"dtype {dtype_names}. Use backend='auto' or backend='torch'."
        )
    return status.module
