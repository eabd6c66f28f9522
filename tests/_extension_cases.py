"""Shared by the tests of the compiled extension: skipping where a compiled backend is
absent, its fixtures and the refusal check (the simulated CUDA grid is in tests/_grid.py).
Runs against the reference go through the one harness, tests/_backend_cases.py."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from belay_kernels import backends
from belay_kernels.backend._library import cpu_module
from belay_kernels.testing import torch_threads


@pytest.fixture(scope="module", autouse=False)
def one_cpu_thread():
    """Run a test module on one intra-op thread. On this shared 2-core machine, OpenMP's
    spinning threads made every op ~40x slower under load (torch's own ops included);
    test_extension_cpu.py checks the parallel split separately."""
    with torch_threads(1):
        yield


def refuses(call, match, *untouched):
    """A direct call of a compiled op raises (TORCH_CHECK_VALUE) and writes nothing."""
    before = [t.clone() for t in untouched]
    with pytest.raises(ValueError, match=match):
        call()
    for t, b in zip(untouched, before):
        assert torch.equal(t, b), "a refused call wrote memory"


def require_backend(name: str) -> None:
    """Skip when the compiled backend is absent, unless CI demands it
    (BELAY_KERNELS_REQUIRE_EXTENSION=1 turns the skip into a failure)."""
    status = backends()[name]
    if status.startswith("available"):
        return
    if os.environ.get("BELAY_KERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(f"backend {name!r} is required here but {status}")
    pytest.skip(f"backend {name!r} {status}")


@pytest.fixture(scope="module")
def cpp_backend():
    require_backend("cpp")


def cpu_isas() -> list[str]:
    """The clones of the CPU loops (csrc/cpu_isa.h) that this CPU runs, narrowest first;
    none without the extension."""
    module, _ = cpu_module()
    return list(module.supported_cpu_isas()) if module is not None else []


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels' clone ``name`` inside the block; then the clone the environment
    chose again (BELAY_KERNELS_CPU_ISA, or the widest)."""
    module, _ = cpu_module()
    module._set_cpu_isa(name)
    try:
        yield
    finally:
        module._set_cpu_isa(os.environ.get("BELAY_KERNELS_CPU_ISA", ""))
