"""The one backend harness: run a method of the method table for several steps through
``belay_kernels.ops`` on a backend, and the reference functions row by row on the same
data, comparing everything the method writes after every call.

Only the table drives it: the roles a method reads and writes, its scalars by kind, and
whether it counts skipped elements. test_backends.py holds the case table; the
backend-specific tests (grid shapes, the CPU's parallel split, ...) call ``check`` too.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from belay_kernels import ops, reference
from belay_kernels.methods import METHODS, Method
from belay_kernels.testing import DTYPE_PAIRS, assert_close, random_like_model, tolerance

STEPS = 6
NONFINITE_STEP = 1  # the step at which some incoming weights are NaN / +inf / -inf
# Rates on both sides of lerp's 0.5 switch; scalar i of a step takes RATES[step + 3 i].
RATES = (0.9, 0.3, 0.999, 0.05, 0.7, 0.2)
# Roles stored in a pair's second dtype. The two-point snapshot is tested there too (the
# kernels accept it), as well as in the weights' dtype by the same-dtype pairs.
SECOND_DTYPE = ("shadow", "snapshot")
PACKED_PAIR = (torch.bfloat16, torch.float32)  # the swap packs bf16 weights into the shadow


def pair_id(pair) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def pairs(method: Method) -> list[tuple]:
    """The dtype pairs a method is tested on: all, and for an exact swap those it has."""
    if method.exact:
        return [p for p in DTYPE_PAIRS if reference.swap_supported(*p)]
    return list(DTYPE_PAIRS)


BY_NAME = {m.name: m for m in METHODS}
METHOD_PAIRS = [(method, pair) for method in METHODS for pair in pairs(method)]


def method_pair_id(value) -> str:
    """The test id of a method or of a dtype pair (parametrizing over METHOD_PAIRS)."""
    return value.name if isinstance(value, Method) else pair_id(value)


@dataclass(frozen=True)
class Case:
    method: Method
    pair: tuple
    sizes: tuple[int, ...]
    layout: str = "flat"  # "flat": each size alone as one tensor; "list": one list of them
    policy: str = "skip"
    scalars: str = "number"  # or "tensor": the hyperparameters as 0-d tensors
    offsets: tuple[int, int] = (0, 0)  # start offsets (weights dtype, second dtype)

    @property
    def id(self) -> str:
        parts = [self.method.name, pair_id(self.pair), self.layout, self.policy, self.scalars]
        if self.offsets != (0, 0):
            parts.append(f"at{self.offsets[0]}-{self.offsets[1]}")
        return " ".join(parts)


# Low halves of fp32 shadow words at and around the rounding tie of the packed bf16/fp32
# swap, where the packing must not be ambiguous.
TIE_LOW_HALVES = (0x8000, 0x8001, 0x7FFF, 0, 0xFFFF, 1)


def _plant_rounding_ties(t: torch.Tensor) -> None:
    bits = t[: len(TIE_LOW_HALVES)].view(torch.int32)
    bits.copy_((bits & ~0xFFFF) | torch.tensor(TIE_LOW_HALVES[: bits.numel()], dtype=torch.int32))


def _inject_nonfinite(t: torch.Tensor, generator: torch.Generator) -> None:
    if t.numel() == 0:
        return
    hits = torch.randint(0, t.numel(), (max(1, t.numel() // 50),), generator=generator)
    for value, positions in zip((float("nan"), float("inf"), float("-inf")), hits.chunk(3)):
        t[positions] = value


class _Data:
    """Fresh random tensors of one case, each placed at its role's start offset (a nonzero
    offset gives a contiguous tensor whose start is not 16-byte aligned)."""

    def __init__(self, case: Case, sizes, device, seed):
        self.case, self.sizes, self.device = case, sizes, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def _second(self, role):
        return role in SECOND_DTYPE

    def fresh(self, role, nonfinite=False):
        dtype = self.case.pair[self._second(role)]
        skip = self.case.offsets[self._second(role)]
        out = []
        for n in self.sizes:
            t = random_like_model(n + skip, dtype, generator=self.generator)[skip:]
            if nonfinite:
                _inject_nonfinite(t, self.generator)
            if self.case.method.exact and role == "shadow" and self.case.pair == PACKED_PAIR:
                _plant_rounding_ties(t)
            out.append(self.placed(role, t))
        return out

    def placed(self, role, t):
        """A copy of ``t`` on the device, starting at the role's offset."""
        skip = self.case.offsets[self._second(role)]
        storage = torch.empty(t.numel() + skip, dtype=t.dtype, device=self.device)
        return storage[skip:].copy_(t)


def step_scalars(method: Method, step: int, as_tensor: bool, pair) -> list[dict]:
    """The scalar arguments of each call of one step, by kind: rates from RATES, the count
    of models so far, and a flag taking each value in turn (swap in, then back)."""
    rate_dtype = torch.float64 if torch.float64 in pair else torch.float32
    values = {}
    for i, s in enumerate(method.scalars):
        if s.kind == "rate":
            v = RATES[(step + 3 * i) % len(RATES)]
            values[s.name] = torch.tensor(v, dtype=rate_dtype) if as_tensor else v
        elif s.kind == "count":
            count_dtype = torch.int64 if step % 2 == 0 else torch.int32
            values[s.name] = torch.tensor(step, dtype=count_dtype) if as_tensor else step
    flags = [s.name for s in method.scalars if s.kind == "flag"]
    if not flags:
        return [values]
    return [dict(values, **dict.fromkeys(flags, flag)) for flag in (False, True)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _compare(method, backend, got, want, where):
    coarsest = max(
        (t.dtype for ts in want.values() for t in ts), key=lambda d: tolerance(d)["rtol"]
    )
    for role in method.written:
        for i, (g, w) in enumerate(zip(got[role], want[role])):
            message = f"{where}: {role}[{i}] of size {g.numel()}"
            assert g.dtype == w.dtype, message
            if backend == "torch" or method.exact:
                assert torch.equal(_bits(g), _bits(w)), f"{message} differs in its bits"
            elif (
                len(method.written) > 1
                and g.dtype != coarsest
                and (backend != "triton" or g.device.type == "cpu")
            ):
                # BELAY feeds the weights back into the shadow: on the compiled C++/CUDA
                # kernels and in Triton's interpreter (its fma rounds twice) an fp32 shadow
                # next to bf16 weights inherits one bf16 rounding difference of the
                # weights per step.
                torch.testing.assert_close(
                    g.double(),
                    w.double(),
                    equal_nan=True,
                    msg=lambda m: f"{message}\n{m}",
                    **tolerance(coarsest),
                )
            else:
                assert_close(g, w, msg=message)


def _run(case: Case, backend: str, sizes, device, steps: int, seed: int) -> None:
    method = case.method
    data = _Data(case, sizes, device, seed)
    read_only = [r for r in method.read if r not in method.written]
    output_only = [r for r in method.written if r not in method.read]
    persistent = [r for r in method.written if r in method.read]
    got = {role: data.fresh(role) for role in persistent}
    want = {role: [t.clone() for t in ts] for role, ts in got.items()}
    counts = method.counts_skipped
    skipped = {k: torch.zeros((), dtype=torch.int64, device=data.device) for k in ("got", "want")}
    skip = case.policy == "skip"
    fn = getattr(ops, method.function)
    as_arg = (lambda ts: ts[0]) if case.layout == "flat" else list

    for step in range(steps):
        nonfinite = step == NONFINITE_STEP
        for role in read_only + output_only:
            got[role] = data.fresh(role, nonfinite=nonfinite and role == "weights")
            want[role] = [t.clone() for t in got[role]]
        if "weights" in persistent:  # the optimizer's step (non-finite where injected)
            for g, w, change in zip(
                got["weights"], want["weights"], data.fresh("weights", nonfinite=nonfinite)
            ):
                g.add_(change * 1e-2)
                w.add_(change * 1e-2)
        before = {role: [t.clone() for t in got[role]] for role in persistent}
        for scalars in step_scalars(method, step, case.scalars == "tensor", case.pair):
            policy = dict(nonfinite=case.policy, skipped=skipped["got"]) if counts else {}
            fn(
                **{role: as_arg(got[role]) for role in method.tensors},
                **scalars,
                **policy,
                backend=backend,
            )
            tail = (skip, skipped["want"]) if counts else ()
            for row in zip(*(want[role] for role in method.tensors)):
                getattr(reference, method.op)(*row, *scalars.values(), *tail)
            where = f"{case.id} {backend} sizes {list(sizes)} step {step} {scalars}"
            _compare(method, backend, got, want, where)
            assert int(skipped["got"]) == int(skipped["want"]), where
        if len(step_scalars(method, step, False, case.pair)) > 1:  # a round trip
            for role in persistent:
                for t, b in zip(got[role], before[role]):
                    assert torch.equal(_bits(t), _bits(b)), f"{where}: no round trip"
    if counts and sum(sizes) > 0:
        if skip:
            assert int(skipped["got"]) > 0, f"{case.id}: the non-finite step was not counted"
        else:
            assert int(skipped["got"]) == 0, case.id
            assert any(t.isnan().any() for role in method.written for t in got[role]), case.id


def check(case: Case, backend: str, *, device="cpu", steps: int = STEPS) -> None:
    """Every call of ``steps`` steps of ``case`` on ``backend`` equals the reference."""
    runs = [(n,) for n in case.sizes] if case.layout == "flat" else [case.sizes]
    for sizes in runs:
        seed = zlib.crc32(f"{case.id} {sizes}".encode())
        _run(case, backend, sizes, device, steps, seed)
