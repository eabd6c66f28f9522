"""The opt-in ``inductor`` backend (the reference through ``torch.compile``) on the CPU:
it matches the reference through the shared backend harness (to the shared tolerance:
inductor may contract multiply-adds differently), its compiled functions are cached per
(op, device type, dtypes) and dynamic in size, and ``backends()`` reports what compiling
cost. Compiling takes seconds per graph, so the case list is short."""

import pytest
import torch
from _backend_cases import BY_NAME, Case, check
from _extension_cases import one_cpu_thread  # noqa: F401 (fixture)

from belay_kernels import _backends, ops
from belay_kernels.backend import inductor

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

FP32 = (torch.float32, torch.float32)
BF16_FP32 = (torch.bfloat16, torch.float32)
SIZES = (1, 3, 1000, 4099)


@pytest.fixture(scope="module", autouse=True)
def compilation_allowed():
    """BELAY_KERNELS_COMPILE=1 for this module, and the backend's status asked afresh."""
    patch = pytest.MonkeyPatch()
    patch.setenv(inductor.ALLOW_ENV, "1")
    patch.delitem(_backends._cache, "inductor", raising=False)
    yield
    patch.undo()
    _backends._cache.pop("inductor", None)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


CASES = [
    Case(BY_NAME["ema"], FP32, SIZES),
    Case(BY_NAME["ema"], BF16_FP32, SIZES, layout="list"),
    Case(BY_NAME["ema"], FP32, SIZES, policy="propagate", scalars="tensor"),
    Case(BY_NAME["swa"], FP32, SIZES),
    Case(BY_NAME["belay"], FP32, SIZES),
    Case(BY_NAME["two_point"], BF16_FP32, SIZES),
    Case(BY_NAME["swap"], BF16_FP32, SIZES),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_inductor_matches_the_reference(case):
    check(case, "inductor", steps=3)


def test_compiled_once_per_dtype_pair_and_dynamic_in_size():
    gen = torch.Generator().manual_seed(0)

    def ema(n, dtypes):
        shadow = torch.randn(n, generator=gen).to(dtypes[1])
        weights = torch.randn(n, generator=gen).to(dtypes[0])
        ops.ema_update_(shadow, weights, decay=0.9, backend="inductor")

    ema(2000, FP32)  # compiles, unless an earlier test did
    key = ("ema_update_", "cpu", FP32)
    compiled = inductor._compiled[key]
    graphs = _unique_graphs()
    for n in (3001, 70001, 17):  # other sizes: the same graph
        ema(n, FP32)
    assert _unique_graphs() == graphs
    assert inductor._compiled[key] is compiled
    ema(2000, (torch.float16, torch.float32))  # a new dtype pair: its own function
    # keyed by the dtypes in argument order: (shadow, weights)
    assert ("ema_update_", "cpu", (torch.float32, torch.float16)) in inductor._compiled
    assert inductor._compiled[key] is compiled
    assert _unique_graphs() > graphs


def test_backends_reports_the_compile_time_after_first_use():
    shadow, weights = torch.randn(500), torch.randn(500)
    ops.belay_step_(weights, shadow, alpha=0.1, beta=0.2, backend="inductor")
    report = _backends.backends()["inductor"]
    assert report.startswith("available"), report
    assert "graphs compiled" in report and " s in all" in report, report
    assert inductor._compile_s[("belay_step_", "cpu", FP32)] > 0
