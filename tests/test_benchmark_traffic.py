"""The byte counts behind every GB/s figure are the minimal ones: each operand the
method's formula reads is counted once, each one it writes once, and nothing else.

What the reference (the spec) actually reads and writes is observed at torch's
dispatcher: a tensor passed to an op is read, unless the op's schema marks it as
written (``Tensor(a!)``); view ops touch no memory and are ignored.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from belay_kernels.benchmark.compiled import reference_calls
from belay_kernels.benchmark.traffic import (
    CALLS_PER_STEP,
    METHODS,
    OPERAND_KIND,
    TRAFFIC,
    bytes_per_call,
    bytes_per_step,
    copy_bytes,
    operand_dtype,
)
from belay_kernels.testing import random_like_model

PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
N = 1009


class _Traffic(TorchDispatchMode):
    """Which of the named tensors the ops under this mode read and write."""

    def __init__(self, named: dict[str, torch.Tensor]):
        super().__init__()
        self.by_storage = {t.untyped_storage().data_ptr(): name for name, t in named.items()}
        self.read, self.written = set(), set()

    def _name(self, value):
        if isinstance(value, torch.Tensor):
            return self.by_storage.get(value.untyped_storage().data_ptr())
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            for i, argument in enumerate(func._schema.arguments):
                value = kwargs.get(argument.name, args[i] if i < len(args) else None)
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    name = self._name(item)
                    if name is None:
                        continue
                    alias = argument.alias_info
                    (self.written if alias is not None and alias.is_write else self.read).add(name)
        return func(*args, **kwargs)


def _operands(weights_dtype, shadow_dtype):
    g = torch.Generator().manual_seed(1)
    return {
        role: random_like_model(N, operand_dtype(role, weights_dtype, shadow_dtype), generator=g)
        for role in OPERAND_KIND
    }


@pytest.mark.parametrize("pair", PAIRS, ids=["fp32-fp32", "bf16-fp32"])
@pytest.mark.parametrize("method", METHODS)
def test_counted_bytes_are_what_the_spec_reads_and_writes_once(method, pair):
    t = _operands(*pair)
    calls = reference_calls(method, t)
    assert len(calls) == CALLS_PER_STEP[method]
    observed_total = 0
    for call in calls:
        with _Traffic(t) as traffic:
            call()
        reads, writes = TRAFFIC[method]
        assert traffic.read == set(reads), f"{method} reads {traffic.read}"
        assert traffic.written == set(writes), f"{method} writes {traffic.written}"
        minimal = sum(t[n].nbytes for n in traffic.read) + sum(t[n].nbytes for n in traffic.written)
        assert bytes_per_call(method, N, *pair) == minimal
        observed_total += minimal
    assert bytes_per_step(method, N, *pair) == observed_total


def test_mixed_precision_ema_counts_bf16_weights_at_two_bytes():
    # shadow read (4) + weights read (2) + shadow written (4)
    assert bytes_per_call("ema", 1000, torch.bfloat16, torch.float32) == 10_000
    assert bytes_per_call("belay", 1000, torch.bfloat16, torch.float32) == 12_000


def test_streaming_copy_counts_read_plus_write():
    assert copy_bytes(1000, torch.float32) == 8000
