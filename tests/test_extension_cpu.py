"""What only the compiled CPU kernels (backend "cpp") do: outputs streamed past the
cache, 16-bit rounding in vector code, the split over threads, auto choosing them, and their
benchmark. Every method against the reference on "cpp" runs in tests/test_backends.py."""

import pytest
import torch
from _backend_cases import BY_NAME, Case, check, pair_id
from _extension_cases import cpp_backend, one_cpu_thread  # noqa: F401 (fixtures)

from belay_kernels.testing import DTYPE_PAIRS, torch_threads

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

MIXED = (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 2)], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_streamed_two_point_output_matches_reference(pair, offsets):
    """Outputs of more than kStreamMinBytes (1 MiB) per thread's chunk are computed into a
    buffer and stored past the cache (cpu_kernels.cpp); smaller ones, as in
    test_backends.py, are stored in place."""
    with torch_threads(2):
        check(Case(BY_NAME["two_point"], pair, ((3 << 20) + 5,), offsets=offsets), "cpp")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1001, (3 << 20) + 5], ids=["stored", "streamed"])
def test_half_rounds_as_torch_bit_for_bit(n, dtype):
    """16-bit results round to nearest, ties to even, exactly as torch's own conversion:
    the two-point average of random finite fp16 or bf16 bit patterns (subnormals, the
    largest values, and ties). On x86 with AVX2 this goes through cpu_half_staging.h
    (F16C for fp16, its own vector rounding for bf16); the streamed size through its
    non-temporal stores. The clones are compared with each other in test_cpu_clones.py."""
    generator = torch.Generator().manual_seed(n)
    bits = torch.randint(-(2**15), 2**15, (2, n), generator=generator, dtype=torch.int32)
    halves = bits.to(torch.int16).view(dtype)
    weights, snapshot = torch.where(halves.isfinite(), halves, 0.0)
    out = torch.empty_like(weights)
    with torch_threads(2):
        torch.ops.belay_kernels.two_point_average_(out, weights, snapshot)
    expected = ((weights.float() + snapshot.float()) * 0.5).to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_auto_prefers_cpp_on_cpu():
    from belay_kernels import _backends

    module = _backends.resolve("auto", "ema_update_", "cpu", (torch.float32,) * 2, True)
    assert module.__name__ == "belay_kernels.backend.cpp"
    # non-contiguous tensors go to the pure-PyTorch backend
    module = _backends.resolve("auto", "ema_update_", "cpu", (torch.float32,) * 2, False)
    assert module is _backends._load("torch").module


def test_parallel_split_matches_reference():
    """More than one task per thread on two threads (the other tests run on one)."""
    with torch_threads(2):
        for name in ("ema", "belay", "two_point"):
            check(Case(BY_NAME[name], MIXED, (200_003,)), "cpp")


def test_extension_benchmark_runs_every_case(tmp_path):
    """bench/bench_extension.py at a tiny size: every case is timed and its bytes counted."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "bench" / "bench_extension.py"
    spec = importlib.util.spec_from_file_location("bench_extension", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "extension.json"
    assert bench.main(["--numel", "4099", "--repeats", "5", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(list(bench.cases(16, torch.device("cpu"))))
    for row in results:
        assert row["bytes"] % 4099 == 0 and row["fused_gb_s"] > 0
        assert row["fused"]["p20_s"] <= row["fused"]["median_s"] <= row["fused"]["p80_s"]
