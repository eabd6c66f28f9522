"""The compiled CPU kernels (backend "cpp") against the reference: every method, every
dtype pair, odd sizes, many steps, both non-finite policies and the skipped counter."""

import pytest
import torch
from _extension_cases import (  # noqa: F401 (cpp_backend, one_cpu_thread: fixtures)
    BELAY_RATES,
    EMA_DECAYS,
    Trajectory,
    check_swap,
    compare_with_reference,
    cpp_backend,
    one_cpu_thread,
    pair_id,
)

from belay_kernels import ops
from belay_kernels.testing import DTYPE_PAIRS, ODD_SIZES, torch_threads

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

SWAP_PAIRS = [p for p in DTYPE_PAIRS if p[0] == p[1]] + [(torch.bfloat16, torch.float32)]


# (method, hyperparameter): every method, with rates on both sides of lerp's switch
METHODS = (
    [("ema", decay) for decay in EMA_DECAYS]
    + [("swa", None)]
    + [("belay", rates) for rates in BELAY_RATES]
    + [("two_point", None)]
)


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method,hyper", METHODS, ids=lambda v: str(v) if v is not None else "")
def test_matches_reference(method, hyper, pair, n):
    compare_with_reference(method, "cpp", Trajectory(pair, [n], seed=n, nonfinite=False),
                           hyper=hyper)


# (weights, shadow) start offsets in elements: misaligned alike, so 16-byte words line up
# after a few elements; and misaligned differently, so they never do.
@pytest.mark.parametrize("offsets", [(1, 1), (3, 3), (1, 2)], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method,hyper", [("ema", 0.9), ("swa", None), ("belay", BELAY_RATES[0]),
                                          ("two_point", None)], ids=lambda v: str(v or ""))
def test_unaligned_starts_match_reference(method, hyper, pair, offsets):
    trajectory = Trajectory(pair, [1009, 70_001], seed=13, nonfinite=True, offsets=offsets)
    compare_with_reference(method, "cpp", trajectory, hyper=hyper)


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 2)], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_streamed_two_point_output_matches_reference(pair, offsets):
    """Outputs of more than kStreamMinBytes (1 MiB) per thread's chunk are computed into a
    buffer and stored past the cache (cpu_kernels.cpp); smaller ones, as in the tests
    above, are stored in place."""
    with torch_threads(2):
        trajectory = Trajectory(pair, [(3 << 20) + 5], seed=17, nonfinite=True, offsets=offsets)
        compare_with_reference("two_point", "cpp", trajectory)


@pytest.mark.parametrize("n", [1001, (3 << 20) + 5], ids=["stored", "streamed"])
def test_fp16_rounds_as_torch_bit_for_bit(n):
    """fp16 results round to nearest, ties to even, exactly as torch's own conversion: the
    two-point average of random finite fp16 bit patterns (subnormals, the largest values,
    and a tie whenever the sum is odd in its last bit), whose fp32 sum is exact. On x86
    with F16C this goes through cpu_fp16_staging.h; the streamed size through its
    non-temporal stores."""
    generator = torch.Generator().manual_seed(n)
    bits = torch.randint(-(2**15), 2**15, (2, n), generator=generator, dtype=torch.int32)
    halves = bits.to(torch.int16).view(torch.float16)
    weights, snapshot = torch.where(halves.isfinite(), halves, 0.0)
    out = torch.empty_like(weights)
    with torch_threads(2):
        torch.ops.belay_kernels.two_point_average_(out, weights, snapshot)
    expected = ((weights.float() + snapshot.float()) * 0.5).half()
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("pair", SWAP_PAIRS, ids=pair_id)
def test_swap_is_bit_exact(pair, n):
    check_swap("cpp", pair, [n], seed=n)


@pytest.mark.parametrize("policy", ["skip", "propagate"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay"])
def test_nonfinite_policy_and_counter(method, pair, policy):
    hyper = {"ema": 0.9, "swa": None, "belay": BELAY_RATES[0]}[method]
    skipped = compare_with_reference(
        method, "cpp", Trajectory(pair, [70_001], seed=7, nonfinite=True),
        policy=policy, hyper=hyper,
    )
    assert (skipped > 0) == (policy == "skip")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay", "two_point"])
def test_tensor_lists_match_reference(method, pair):
    hyper = {"ema": 0.9, "swa": None, "belay": BELAY_RATES[1], "two_point": None}[method]
    sizes = [1009, 0, 3, 70_001, 31]
    compare_with_reference(method, "cpp", Trajectory(pair, sizes, seed=3, nonfinite=True),
                           hyper=hyper)


def test_tensor_list_swap_is_bit_exact():
    check_swap("cpp", (torch.bfloat16, torch.float32), [1009, 0, 3, 70_001], seed=5)


def test_hyperparameters_as_tensors_match_numbers():
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1009, generator=generator)
    for backend_kwargs in ({"decay": 0.9}, {"decay": torch.tensor(0.9, dtype=torch.float64)}):
        shadow = torch.linspace(-1, 1, 1009)
        ops.ema_update_(shadow, weights, backend="cpp", **backend_kwargs)
        expected = torch.linspace(-1, 1, 1009)
        ops.ema_update_(expected, weights, decay=0.9, backend="torch")
        torch.testing.assert_close(shadow, expected)
    shadow = torch.linspace(-1, 1, 1009)
    ops.swa_update_(shadow, weights, count=torch.tensor(3), backend="cpp")
    expected = torch.linspace(-1, 1, 1009)
    ops.swa_update_(expected, weights, count=3, backend="torch")
    torch.testing.assert_close(shadow, expected)


def test_auto_prefers_cpp_on_cpu():
    from belay_kernels import _backends

    module = _backends.resolve("auto", "ema_update_", "cpu", (torch.float32,) * 2, True)
    assert module.__name__ == "belay_kernels.extension.cpu"
    # non-contiguous tensors go to the pure-PyTorch backend
    module = _backends.resolve("auto", "ema_update_", "cpu", (torch.float32,) * 2, False)
    assert module is _backends._load("torch").module

def test_parallel_split_matches_reference():
    """More than one task per thread on two threads (the other tests run on one)."""
    with torch_threads(2):
        for method, hyper in (("ema", 0.9), ("belay", BELAY_RATES[0]), ("two_point", None)):
            compare_with_reference(
                method, "cpp", Trajectory((torch.bfloat16, torch.float32), [200_003], seed=2,
                                          nonfinite=True), hyper=hyper)


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
