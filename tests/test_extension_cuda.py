"""The CUDA kernels (backend "cuda") on a GPU, beyond test_backends.py's cases: sizes of
millions of elements, unaligned starts of flat tensors, more tensors than one launch
holds, hyperparameters as device tensors, the launch on the current stream, the K-profile
EMA, and rates of one over non-finite values. Skipped where torch sees no CUDA device
(the bodies are also checked on the CPU, test_extension_grid)."""

import pytest
import torch
from _backend_cases import METHOD_PAIRS, Case, check, method_pair_id, pair_id
from _extension_cases import require_backend

from belay_kernels import ops
from belay_kernels.testing import DTYPE_PAIRS, ODD_SIZES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    require_backend("cuda")


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 2)], ids=str)
@pytest.mark.parametrize("method,pair", METHOD_PAIRS, ids=method_pair_id)
def test_matches_reference(method, pair, offsets):
    check(Case(method, pair, ODD_SIZES + (3_000_017,), offsets=offsets), "cuda", device="cuda")


@pytest.mark.parametrize("method,pair", METHOD_PAIRS, ids=method_pair_id)
def test_tensor_lists_match_reference(method, pair):
    sizes = (200_003, 0, 1, 3, 31, 1009) * 6  # more tensors than one launch holds
    check(Case(method, pair, sizes, layout="list", offsets=(1, 1)), "cuda", device="cuda")


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


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_multi_ema_matches_k_reference_updates(pair):
    from belay_kernels import reference
    from belay_kernels.backend import cuda

    generator = torch.Generator().manual_seed(0)
    decays = [
        0.9,
        torch.tensor(0.3, dtype=torch.float64, device="cuda"),
        0.0,
        torch.tensor(float("nan"), dtype=torch.float64, device="cuda"),
        0.999,
    ]
    for sizes in ([3_000_017], [200_003, 0, 1, 1009] * 6):
        shadows = [
            [torch.randn(n, generator=generator).to(pair[1]).cuda() for n in sizes] for _ in decays
        ]
        expected = [[s.clone() for s in profile] for profile in shadows]
        skipped = torch.zeros((), dtype=torch.int64, device="cuda")
        skipped_ref = torch.zeros((), dtype=torch.int64, device="cuda")
        for step in range(4):
            weights = [torch.randn(n, generator=generator).to(pair[0]).cuda() for n in sizes]
            if step == 1:
                for w in weights:
                    w[::97] = float("nan")
            cuda.multi_ema_update_foreach_(shadows, weights, decays, step != 2, skipped)
            for profile, decay in zip(expected, decays):
                for s, w in zip(profile, weights):
                    reference.ema_update_(s, w, decay, step != 2, skipped_ref)
        for profile, want_profile in zip(shadows, expected):
            for got, want in zip(profile, want_profile):
                torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert int(skipped) == int(skipped_ref)


def test_a_rate_of_one_copies_over_nonfinite_values():
    weights = torch.randn(100_003, device="cuda")
    for decay in (0.0, torch.tensor(0.0, dtype=torch.float64, device="cuda")):
        shadow = torch.full((100_003,), float("nan"), device="cuda")
        shadow[::2] = float("inf")
        ops.ema_update_(shadow, weights, decay=decay, nonfinite="propagate", backend="cuda")
        assert torch.equal(shadow, weights)
    shadow = torch.full((100_003,), float("-inf"), device="cuda")
    ops.swa_update_(shadow, weights, count=0, nonfinite="propagate", backend="cuda")
    assert torch.equal(shadow, weights)
