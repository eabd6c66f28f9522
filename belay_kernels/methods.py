"""The one table of methods: each op declared once, with the tensors it reads and writes
and its scalar arguments. Everything that needs a list of the ops derives it from here:
:mod:`belay_kernels.ops`, the compiled extension's glue and fake registrations, the
Triton backend, the benchmark's byte counts and cases, and the tests' case table.

The math of each op is in :mod:`belay_kernels.reference`.

An op's backend functions share its positional signature: the tensors in ``tensors``
order, then the scalars in ``scalars`` order, then ``skip_nonfinite, skipped`` when the
op ``counts_skipped``. The list variant (``foreach``) takes one list per tensor role.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (weights dtype, shadow dtype) that the compiled kernels cover: one dtype, and the
# mixed-precision normal case of 16-bit weights with an fp32 shadow.
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)


@dataclass(frozen=True)
class Scalar:
    """A scalar argument. ``kind``: ``"rate"`` (a float in [0, 1], a number or a 0-d
    tensor), ``"count"`` (an int >= 0, a number or a 0-d tensor) or ``"flag"`` (a bool).
    ``typical`` is the value the benchmark and the test cases use."""

    name: str
    kind: str
    typical: float | int | bool


@dataclass(frozen=True)
class Method:
    """One op. ``tensors`` are its tensor roles in argument order, ``written`` the roles it
    writes; ``storage`` says whether a role is stored in the weights' or the shadow's
    dtype."""

    name: str  # short name used by the benchmark, the CLI and the tests
    op: str  # backend function, and torch.ops.belay_kernels.<op>
    foreach: str  # the list variant, same name in Python and C++
    tensors: tuple[str, ...]
    written: tuple[str, ...]
    output_only: tuple[str, ...] = ()  # written roles it never reads (a pure output)
    scalars: tuple[Scalar, ...] = ()
    counts_skipped: bool = False  # takes skip_nonfinite and the skipped counter
    calls_per_step: int = 1  # op calls in one timed benchmark step
    public: str = ""  # its function in belay_kernels.ops when not named ``op``
    exact: bool = False  # moves bits without arithmetic: every backend matches bit for bit
    # The roles whose dtypes pick a compiled kernel, as (weights, shadow) of DTYPE_PAIRS;
    # every other role has the first one's dtype.
    kernel_pair: tuple[str, str] = ("weights", "shadow")

    @property
    def function(self) -> str:
        """The name of the public function in :mod:`belay_kernels.ops`; it takes every
        tensor role and scalar by name."""
        return self.public or self.op

    @property
    def written_columns(self) -> tuple[int, ...]:
        return tuple(self.tensors.index(role) for role in self.written)

    @property
    def read(self) -> tuple[str, ...]:
        """The roles whose values the op reads: all but a pure output."""
        return tuple(r for r in self.tensors if r not in self.output_only)

    def storage(self, role: str) -> str:
        """``"weights"`` or ``"shadow"``: the dtype a role is stored in."""
        return "shadow" if role == "shadow" else "weights"

    def dtype_of(self, role: str, weights_dtype: torch.dtype, shadow_dtype: torch.dtype):
        return shadow_dtype if self.storage(role) == "shadow" else weights_dtype


METHODS = (
    Method(
        name="ema",
        op="ema_update_",
        foreach="ema_update_foreach_",
        tensors=("shadow", "weights"),
        written=("shadow",),
        scalars=(Scalar("decay", "rate", 0.999),),
        counts_skipped=True,
    ),
    Method(
        name="swa",
        op="swa_update_",
        foreach="swa_update_foreach_",
        tensors=("shadow", "weights"),
        written=("shadow",),
        scalars=(Scalar("count", "count", 7),),
        counts_skipped=True,
    ),
    Method(
        name="belay",
        op="belay_step_",
        foreach="belay_step_foreach_",
        tensors=("weights", "shadow"),
        written=("weights", "shadow"),
        scalars=(Scalar("alpha", "rate", 0.001), Scalar("beta", "rate", 0.01)),
        counts_skipped=True,
    ),
    Method(
        name="two_point",
        op="two_point_average_",
        foreach="two_point_average_foreach_",
        tensors=("out", "weights", "snapshot"),
        written=("out",),
        output_only=("out",),
        public="two_point_average",
        kernel_pair=("weights", "snapshot"),
    ),
    Method(
        name="swap",
        op="swap_",
        foreach="swap_foreach_",
        tensors=("weights", "shadow"),
        written=("weights", "shadow"),
        scalars=(Scalar("inverse", "flag", False),),
        exact=True,
        calls_per_step=2,  # what averaged() does: swap in, then back
    ),
)

# K EMA profiles of the same weights in one pass (post-hoc EMA). Its ``shadows`` role is a
# list of K tensors per row, which the one-tensor-per-role harnesses and benchmark cases
# built from METHODS do not take, so it stands beside the table: tests/test_multi_ema.py
# runs it on every backend, and benchmark/multi_profile.py times it.
MULTI_EMA = Method(
    name="multi_ema",
    op="multi_ema_update_",
    foreach="multi_ema_update_foreach_",
    tensors=("shadows", "weights"),
    written=("shadows",),
    scalars=(Scalar("decays", "rate", 0.999),),
    counts_skipped=True,
)

BY_NAME = {m.name: m for m in (*METHODS, MULTI_EMA)}
BY_OP = {m.op: m for m in (*METHODS, MULTI_EMA)}
NAMES = tuple(m.name for m in METHODS)
