"""Every method of the method table on every backend available here, against the
reference, from one case table: every dtype pair, the odd sizes, many steps, both
non-finite policies with the skipped counter, one flat tensor and tensor lists,
hyperparameters as numbers and as tensors, and unaligned starts.

Backends: "torch" (the reference through ops, bit for bit), "cpp" (the widest clone of the
CPU loops that this CPU runs), "cpp-avx2" and "cpp-baseline" (the narrower clones, where
the CPU has them: csrc/cpu_isa.h), "grid" (the compiled CUDA bodies on a simulated grid of
3 blocks of 32 threads), "cuda" on a GPU, and
"triton" under Triton's interpreter: TRITON_INTERPRET=1 must be set before triton is
imported, so tests/test_triton_interpreter.py runs this file in a subprocess with it,
where only the triton cases are collected (over fewer steps: the interpreter is slow).
"""

import contextlib
import os

import pytest
import torch
from _backend_cases import METHOD_PAIRS, STEPS, Case, check
from _extension_cases import cpu_isa, cpu_isas, require_backend
from _grid import simulated_grid

from belay_kernels.testing import ODD_SIZES, torch_threads

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
LIST_SIZES = (1009, 0, 1, 3, 70_001, 31, 8197)  # 8197 spans more than two Triton blocks
# (weights, second) start offsets in elements: misaligned alike, so 16-byte words line up
# after a few elements; and misaligned differently, so they never do.
OFFSETS = ((1, 1), (3, 3), (1, 2))


def cases():
    for method, pair in METHOD_PAIRS:
        yield Case(method, pair, ODD_SIZES)
        yield Case(method, pair, LIST_SIZES, layout="list")
        for offsets in OFFSETS:
            yield Case(method, pair, (1009, 70_001), layout="list", offsets=offsets)
        if method.counts_skipped:
            yield Case(method, pair, (70_001,), policy="propagate")
        if any(s.kind != "flag" for s in method.scalars):
            yield Case(method, pair, (1009,), scalars="tensor")
            yield Case(method, pair, (1, 3, 1009), layout="list", scalars="tensor")


CASES = list(cases())

if IN_INTERPRETER:
    pytest.importorskip("triton")
    import _triton_interpreter

    _triton_interpreter.round_bf16_like_the_gpu()
    BACKENDS = {"triton": ("cpu", 3)}
else:
    BACKENDS = {"torch": ("cpu", STEPS), "cpp": ("cpu", STEPS), "grid": ("cpu", STEPS)}
    for isa in cpu_isas()[:-1]:
        BACKENDS[f"cpp-{isa}"] = ("cpu", STEPS)
    if torch.cuda.is_available():
        BACKENDS["cuda"] = ("cuda", STEPS)
        BACKENDS["triton"] = ("cuda", STEPS)  # compiled for the GPU (bench/gpu_check.sh)

# NaN/inf inputs make numpy warn inside the Triton interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """On one intra-op thread: OpenMP's spinning threads slow every op on a shared
    machine; test_extension_cpu.py checks the parallel split."""
    with torch_threads(1):
        yield


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case):
    device, steps = BACKENDS[backend]
    if backend.startswith(("cpp", "grid", "cuda")):
        require_backend("cuda" if backend == "cuda" else "cpp")
    if backend == "grid":
        context = simulated_grid(3, 32)
    elif backend.startswith("cpp-"):
        context = cpu_isa(backend.removeprefix("cpp-"))
    else:
        context = contextlib.nullcontext()
    with context:
        compiled_on_cpu = backend == "grid" or backend.startswith("cpp-")
        check(case, "cpp" if compiled_on_cpu else backend, device=device, steps=steps)
