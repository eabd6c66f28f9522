"""Fused kernels for averaged ("shadow") weights in PyTorch training: EMA, SWA, BELAY and
the two-point average, one pass over memory per (device, dtype) group and step."""

from . import ops
from ._backends import backends
from ._checks import BelayInputError

__all__ = ["BelayInputError", "backends", "ops"]
__version__ = "0.1.0"
