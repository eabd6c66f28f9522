"""The CUDA kernels (backend "cuda") against the reference on a GPU: every method and
dtype pair, odd and unaligned sizes, many steps, the non-finite counter, tensor lists,
hyperparameters as device tensors, and the launch on the current stream. Skipped where
torch sees no CUDA device (the bodies are also checked on the CPU, test_extension_grid)."""

import pytest
import torch
from _extension_cases import (
    BELAY_RATES,
    Trajectory,
    check_swap,
    compare_with_reference,
    pair_id,
    require_backend,
)

from belay_kernels import ops
from belay_kernels.testing import DTYPE_PAIRS, ODD_SIZES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HYPER = {"ema": 0.9, "swa": None, "belay": BELAY_RATES[0], "two_point": None}


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    require_backend("cuda")


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 2)], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay", "two_point"])
def test_matches_reference(method, pair, offsets):
    for n in ODD_SIZES + (3_000_017,):
        trajectory = Trajectory(pair, [n], seed=n, nonfinite=True, offsets=offsets, device="cuda")
        compare_with_reference(method, "cuda", trajectory, hyper=HYPER[method])


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay", "two_point"])
def test_tensor_lists_match_reference(method, pair):
    sizes = [200_003, 0, 1, 3, 31, 1009] * 6  # more tensors than one launch holds
    trajectory = Trajectory(pair, sizes, seed=4, nonfinite=True, offsets=(1, 1), device="cuda")
    compare_with_reference(method, "cuda", trajectory, hyper=HYPER[method])


@pytest.mark.parametrize("pair", [(torch.float32,) * 2, (torch.bfloat16, torch.float32)], ids=pair_id)
def test_swap_is_bit_exact(pair):
    check_swap("cuda", pair, [1, 3, 1009, 3_000_017], seed=1, device="cuda")


def test_device_hyperparameters_and_current_stream():
    weights = torch.randn(100_003, device="cuda")
    expected = torch.linspace(-1, 1, 100_003, device="cuda")
    ops.ema_update_(expected, weights, decay=0.9, backend="torch")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        shadow = torch.linspace(-1, 1, 100_003, device="cuda")
        ops.ema_update_(shadow, weights, decay=torch.tensor(0.9, device="cuda"), backend="cuda")
    stream.synchronize()
    torch.testing.assert_close(shadow, expected)
