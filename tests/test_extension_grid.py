"""The CUDA kernels' bodies (csrc/grid_body.h), run on the CPU over simulated grids and
compared with the reference: aligned and unaligned starts, tails shorter than a vector,
sizes much larger than the grid, and tensor lists cut into chunks and several launches."""

import contextlib

import pytest
import torch
from _extension_cases import (  # noqa: F401 (cpp_backend, one_cpu_thread: fixtures)
    BELAY_RATES,
    Trajectory,
    check_swap,
    compare_with_reference,
    cpp_backend,
    one_cpu_thread,
    pair_id,
)

from belay_kernels.testing import DTYPE_PAIRS

pytestmark = pytest.mark.usefixtures("cpp_backend", "one_cpu_thread")

# (blocks, threads): one thread alone; a warp-sized grid; an odd grid.
GRIDS = ((1, 1), (3, 32), (2, 5))
SIZES = (1, 3, 31, 1009, 20_011)
# (weights, shadow) start offsets in elements: aligned; both misaligned alike (a scalar
# head, then vectors); misaligned differently (no index aligns both: all scalar).
OFFSETS = ((0, 0), (1, 1), (1, 2))
LIST_CHUNK = 64  # elements per simulated block in list launches: many chunks and launches


@contextlib.contextmanager
def simulated_grid(blocks, threads, chunk=LIST_CHUNK):
    from belay_kernels import _C

    _C._simulate_cuda_grid(blocks, threads, chunk)
    try:
        yield
    finally:
        _C._simulate_cuda_grid(0, 0, 0)


HYPER = {"ema": 0.9, "swa": None, "belay": BELAY_RATES[0], "two_point": None}


@pytest.mark.parametrize("offsets", OFFSETS, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay", "two_point"])
def test_flat_bodies_match_reference(method, pair, grid, offsets):
    with simulated_grid(*grid):
        for n in SIZES:
            trajectory = Trajectory(pair, [n], seed=n, nonfinite=True, offsets=offsets)
            compare_with_reference(method, "cpp", trajectory, hyper=HYPER[method])


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("method", ["ema", "swa", "belay", "two_point"])
def test_list_bodies_match_reference(method, pair):
    # 30 tensors (more than one launch holds), one of them 20k elements (more chunks
    # than one launch holds), empty ones, and short tails
    sizes = [20_011, 0, 1, 3, 31, 1009] * 5
    with simulated_grid(1, 32):
        trajectory = Trajectory(pair, sizes, seed=11, nonfinite=True, offsets=(1, 1))
        compare_with_reference(method, "cpp", trajectory, hyper=HYPER[method])


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_list_chunks_split_across_blocks_match_reference(pair):
    # 16 blocks and 7 chunks (20_011 elements in chunks of 4096, then 2 small tensors): the
    # launch gives each chunk ceil(16 / 7) = 3 blocks, as it fills a GPU with big tensors.
    with simulated_grid(16, 4, chunk=4096):
        for method in ("ema", "belay"):
            trajectory = Trajectory(pair, [20_011, 3, 1009], seed=12, nonfinite=True,
                                    offsets=(1, 1))
            compare_with_reference(method, "cpp", trajectory, hyper=HYPER[method])


@pytest.mark.parametrize(
    "pair", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)],
    ids=pair_id,
)
def test_swap_bodies_are_bit_exact(pair):
    with simulated_grid(3, 32):
        check_swap("cpp", pair, [1, 3, 31, 1009, 20_011], seed=1)


def test_the_simulation_really_runs_the_grid():
    """A grid of zero threads must leave the tensors untouched; if this failed, the tests
    above would be testing the CPU loops instead of the CUDA bodies."""
    from belay_kernels import ops

    shadow, weights = torch.ones(100), torch.full((100,), 3.0)
    with simulated_grid(1, 0):
        ops.ema_update_(shadow, weights, decay=0.5, backend="cpp")
    assert torch.equal(shadow, torch.ones(100))
