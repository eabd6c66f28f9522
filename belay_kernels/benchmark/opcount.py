"""How many operator calls (and, on CUDA, kernel launches) one step makes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _AtenCallCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_op_calls(step) -> int:
    """Operator calls through torch's dispatcher during one ``step()``: every aten op and
    every custom op registered with torch.library (views and scalar reads included).
    Work done inside one fused kernel counts once."""
    with _AtenCallCounter() as counter:
        step()
    return counter.calls


def count_kernel_launches(step) -> int | None:
    """CUDA kernels launched during one ``step()`` (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
