"""The clones of the CPU loops (csrc/cpu_isa.h: baseline x86-64, AVX2, AVX-512) give the
same bits. Every method of the method table, the K-profile EMA, and the fused optimizer
steps with every average, run under each clone this CPU has on the same data, on every dtype pair, at sizes
that take the vector bodies, their tails and the parallel split; every tensor they write is
compared bit for bit with the baseline clone's, NaN included. (Only an fp16 NaN carrying a
payload may differ: F16C keeps its payload where c10's scalar code, in the baseline clone,
writes 0x7E00, cpu_half_staging.h. The NaNs here are arithmetic's.) Each clone is checked
against the reference too: test_backends.py runs its harness under each.

Where the CPU has one clone only there is nothing to compare, and the tests skip."""

import os
import subprocess
import sys
import zlib

import pytest
import test_extension_fused as fused
import torch
from _backend_cases import METHOD_PAIRS, Case, _bits, _Data, method_pair_id, step_scalars
from _extension_cases import (  # noqa: F401 (cpp_backend: a fixture)
    cpp_backend,
    cpu_isa,
    cpu_isas,
)

from belay_kernels import ops
from belay_kernels.backend._library import cpu_module
from belay_kernels.testing import torch_threads

pytestmark = pytest.mark.usefixtures("cpp_backend")

# Tails alone, vector bodies with tails, and (at two threads) more than one task.
SIZES = (1, 3, 31, 1009, 70_001)
STEPS = 3
NONFINITE_STEP = 1


@pytest.fixture(scope="module")
def wider_clones():
    """The clones compared with the baseline: those this CPU runs besides it."""
    wider = cpu_isas()[1:]
    if not wider:
        pytest.skip("this CPU runs the baseline clone only")
    return wider


def _method_run(case: Case, threads: int) -> list[torch.Tensor]:
    """Everything the method writes, after every call of STEPS steps on fresh data."""
    method = case.method
    data = _Data(case, case.sizes, "cpu", seed=zlib.crc32(case.id.encode()))
    tensors = {role: data.fresh(role) for role in method.tensors}
    skipped = torch.zeros((), dtype=torch.int64)
    written = []
    with torch_threads(threads):
        for step in range(STEPS):
            for role in method.read:
                if role not in method.written:
                    tensors[role] = data.fresh(role, nonfinite=step == NONFINITE_STEP)
            for scalars in step_scalars(method, step, False, case.pair):
                policy = dict(nonfinite="skip", skipped=skipped) if method.counts_skipped else {}
                getattr(ops, method.function)(
                    **{role: list(ts) for role, ts in tensors.items()},
                    **scalars,
                    **policy,
                    backend="cpp",
                )
                written += [t.clone() for role in method.written for t in tensors[role]]
    return [*written, skipped]


def _assert_same_bits(got, want, label):
    assert len(got) == len(want), label
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{label}: tensor {i}"
        differ = _bits(g) != _bits(w)
        assert not differ.any(), (
            f"{label}: tensor {i}, {int(differ.sum())} of {g.numel()} elements differ"
        )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method, pair", METHOD_PAIRS, ids=method_pair_id)
def test_methods_give_the_baseline_bits(wider_clones, method, pair, threads):
    case = Case(method, pair, SIZES, layout="list")
    with cpu_isa("baseline"):
        want = _method_run(case, threads)
    for isa in wider_clones:
        with cpu_isa(isa):
            _assert_same_bits(_method_run(case, threads), want, f"{case.id} {isa}")


# The K-profile EMA stands beside the method table: decays on both sides of lerp's switch
# (one K-profile loop), then all above 0.5 (its other loop, lerp_below_half).
MULTI_DECAYS = ((0.9, 0.3, 0.0, 0.999, 0.5), (0.9, 0.999, 0.5000001, 0.75, 0.99))


def _multi_run(k, pair, decays, threads) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(k)
    weights_dtype, shadow_dtype = pair

    def fresh(dtype):
        return [torch.randn(n, generator=generator).to(dtype) for n in SIZES]

    shadows = [fresh(shadow_dtype) for _ in range(k)]
    skipped = torch.zeros((), dtype=torch.int64)
    written = []
    with torch_threads(threads):
        for step in range(STEPS):
            weights = fresh(weights_dtype)
            if step == NONFINITE_STEP:
                for w in weights:
                    w[::7] = float("nan")
                    w[3::11] = float("inf")
            ops.multi_ema_update_(
                shadows, weights, decays=list(decays[:k]), skipped=skipped, backend="cpp"
            )
            written += [t.clone() for profile in shadows for t in profile]
    return [*written, skipped]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("decays", MULTI_DECAYS, ids=["mixed", "above-half"])
@pytest.mark.parametrize("pair", fused.DTYPE_PAIRS, ids=fused.pair_id)
@pytest.mark.parametrize("k", (2, 5))
def test_multi_ema_gives_the_baseline_bits(wider_clones, k, pair, decays, threads):
    with cpu_isa("baseline"):
        want = _multi_run(k, pair, decays, threads)
    for isa in wider_clones:
        with cpu_isa(isa):
            _assert_same_bits(_multi_run(k, pair, decays, threads), want, f"K={k} {isa}")


def _fused_tensors(state) -> list[torch.Tensor]:
    return [
        t
        for value in state.tensors().values()
        for t in (value if isinstance(value, list) else [value])
    ]


@pytest.mark.parametrize("average", fused.AVERAGES)
@pytest.mark.parametrize(
    "optimizer, options",
    [("adam", name) for name in fused.ADAM_OPTIONS] + [("sgd", name) for name in fused.SGD_OPTIONS],
)
@pytest.mark.parametrize("pair", fused.DTYPE_PAIRS, ids=fused.pair_id)
def test_fused_steps_give_the_baseline_bits(wider_clones, pair, optimizer, options, average):
    settings = (fused.ADAM_OPTIONS if optimizer == "adam" else fused.SGD_OPTIONS)[options]

    def run():
        ours, _ = fused.run_both(optimizer, pair, settings, average, sizes=SIZES)
        return _fused_tensors(ours)

    with cpu_isa("baseline"):
        want = run()
    for isa in wider_clones:
        with cpu_isa(isa):
            _assert_same_bits(run(), want, f"{optimizer} {options} {average} {isa}")


def test_an_unknown_clone_is_refused_and_changes_nothing():
    module, _ = cpu_module()
    before = module.cpu_isa()
    with pytest.raises(ValueError, match="BELAY_KERNELS_CPU_ISA=avx1024: this CPU runs the clones"):
        module._set_cpu_isa("avx1024")
    assert module.cpu_isa() == before


def _backends_line(isa: str) -> str:
    """The cpp line of ``belay-kernels backends`` run with BELAY_KERNELS_CPU_ISA=isa."""
    result = subprocess.run(
        [sys.executable, "-m", "belay_kernels.cli", "backends"],
        env={**os.environ, "BELAY_KERNELS_CPU_ISA": isa},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return next(line for line in result.stdout.splitlines() if line.startswith("cpp "))


def test_the_environment_chooses_the_clone():
    assert "CPU loops: the baseline clone" in _backends_line("baseline")
    widest = cpu_isas()[-1]
    assert f"CPU loops: the {widest} clone" in _backends_line("")
    refused = _backends_line("avx1024")
    assert "unavailable" in refused and "BELAY_KERNELS_CPU_ISA=avx1024" in refused
