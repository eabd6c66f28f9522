"""The CUDA kernels' bodies (csrc/grid_body.h), run on the CPU over simulated grids of
other shapes than test_backends.py's one (3 blocks of 32 threads) and compared with the
reference: aligned and unaligned starts, tails shorter than a vector, sizes much larger
than the grid, and tensor lists cut into chunks and several launches."""

import contextlib

import pytest
import torch
from _backend_cases import BY_NAME, METHOD_PAIRS, Case, check, method_pair_id, pair_id
from _extension_cases import (  # noqa: F401 (cpp_backend, one_cpu_thread: fixtures)
    cpp_backend,
    one_cpu_thread,
)
from _grid import simulated_grid

from belay_kernels.testing import DTYPE_PAIRS, random_like_model

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

# (blocks, threads): one thread alone; a warp-sized grid; an odd grid.
GRIDS = ((1, 1), (3, 32), (2, 5))
SIZES = (1, 3, 31, 1009, 20_011)
# (weights, shadow) start offsets in elements: aligned; both misaligned alike (a scalar
# head, then vectors); misaligned differently (no index aligns both: all scalar).
OFFSETS = ((0, 0), (1, 1), (1, 2))


@pytest.mark.parametrize("offsets", OFFSETS, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("method,pair", METHOD_PAIRS, ids=method_pair_id)
def test_flat_bodies_match_reference(method, pair, grid, offsets):
    with simulated_grid(*grid):
        check(Case(method, pair, SIZES, offsets=offsets), "cpp")


@pytest.mark.parametrize("method,pair", METHOD_PAIRS, ids=method_pair_id)
def test_list_bodies_match_reference(method, pair):
    # 30 tensors (more than one launch holds), one of them 20k elements (more chunks
    # than one launch holds), empty ones, and short tails
    sizes = (20_011, 0, 1, 3, 31, 1009) * 5
    with simulated_grid(1, 32):
        check(Case(method, pair, sizes, layout="list", offsets=(1, 1)), "cpp")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_list_chunks_split_across_blocks_match_reference(pair):
    # 16 blocks and 7 chunks (20_011 elements in chunks of 4096, then 2 small tensors): the
    # launch gives each chunk ceil(16 / 7) = 3 blocks, as it fills a GPU with big tensors.
    with simulated_grid(16, 4, chunk=4096):
        for name in ("ema", "belay"):
            check(
                Case(BY_NAME[name], pair, (20_011, 3, 1009), layout="list", offsets=(1, 1)), "cpp"
            )


def test_the_simulation_really_runs_the_grid():
    """A grid of zero threads must leave the tensors untouched; if this failed, the tests
    above would be testing the CPU loops instead of the CUDA bodies."""
    from belay_kernels import ops

    shadow, weights = torch.ones(100), torch.full((100,), 3.0)
    with simulated_grid(1, 0):
        ops.ema_update_(shadow, weights, decay=0.5, backend="cpp")
    assert torch.equal(shadow, torch.ones(100))


def _nonfinite_shadow(n, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shadow = random_like_model(n, dtype, generator=generator)
    shadow[::3], shadow[1::3] = float("nan"), float("inf")
    shadow[2::7] = float("-inf")
    return shadow, random_like_model(n, dtype, generator=generator)


def _bits_equal(got, want):
    """Bit for bit where ``want`` is a number, NaN where it is NaN (torch's own conversion
    to 16 bits does not give the canonical NaN that the kernels store)."""
    want = want.to(got.dtype)
    nan = torch.isnan(want)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    same = (got.view(bits) == want.view(bits)) | nan
    return bool(same.all()) and torch.equal(torch.isnan(got), nan)


@pytest.mark.parametrize("scalar", ["number", "tensor"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("grid", [None, (3, 32), (2, 5)], ids=str)
def test_a_rate_of_one_copies_over_nonfinite_values(grid, pair, scalar):
    """EMA decay 0, SWA count 0 and BELAY alpha = beta = 1 copy exactly, even where the
    value copied over is NaN or inf (torch.lerp would give NaN there), under the propagate
    policy, on the CUDA bodies (simulated grid) and on the CPU loops (grid None)."""
    from belay_kernels import ops

    weights_dtype, shadow_dtype = pair

    def value(x, dtype=torch.float64):
        return torch.tensor(x, dtype=dtype) if scalar == "tensor" else x

    with simulated_grid(*grid) if grid else contextlib.nullcontext():
        for n in (1, 3, 1009):
            shadow, _ = _nonfinite_shadow(n, shadow_dtype, seed=n)
            _, weights = _nonfinite_shadow(n, weights_dtype, seed=n + 1)
            ops.ema_update_(shadow, weights, decay=value(0.0), nonfinite="propagate", backend="cpp")
            assert _bits_equal(shadow, weights), "EMA decay 0"
            shadow, _ = _nonfinite_shadow(n, shadow_dtype, seed=n + 2)
            ops.swa_update_(
                shadow, weights, count=value(0, torch.int64), nonfinite="propagate", backend="cpp"
            )
            assert _bits_equal(shadow, weights), "SWA count 0"
            shadows = [_nonfinite_shadow(n, shadow_dtype, seed=n + 3 + p)[0] for p in range(3)]
            _cpp().multi_ema_update_(shadows, weights, [value(0.0), 0.5, value(0.0)], False, None)
            assert _bits_equal(shadows[0], weights) and _bits_equal(shadows[2], weights)
            # BELAY: weights <- shadow (beta 1) and shadow <- weights (alpha 1), both
            # from the values before the call, NaN and inf on both sides
            model, _ = _nonfinite_shadow(n, weights_dtype, seed=n + 7)
            shadow = random_like_model(n, shadow_dtype, generator=torch.Generator().manual_seed(n))
            shadow[::5] = float("nan")
            model_before, shadow_before = model.clone(), shadow.clone()
            ops.belay_step_(
                model,
                shadow,
                alpha=value(1.0),
                beta=value(1.0),
                nonfinite="propagate",
                backend="cpp",
            )
            assert _bits_equal(model, shadow_before), "BELAY beta 1"
            assert _bits_equal(shadow, model_before), "BELAY alpha 1"


def _cpp():
    from belay_kernels.backend import cpp

    return cpp
