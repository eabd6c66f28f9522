"""Fused kernels for averaged ("shadow") weights in PyTorch training: EMA, SWA, BELAY and
the two-point average, one pass over memory per (device, dtype) group and step."""

from . import ops, posthoc, power, schedules
from ._backends import backends
from ._checks import BelayInputError
from .averagers import EMA, SWA, Averager, Belay, TwoPoint
from .fused import FusedOptimizer, fuse
from .posthoc import PostHocEMA, PowerEMA

__all__ = [
    "EMA",
    "SWA",
    "Averager",
    "Belay",
    "BelayInputError",
    "FusedOptimizer",
    "PostHocEMA",
    "PowerEMA",
    "TwoPoint",
    "backends",
    "fuse",
    "ops",
    "posthoc",
    "power",
    "schedules",
]
__version__ = "0.1.0"
