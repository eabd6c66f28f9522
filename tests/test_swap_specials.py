"""The packed bf16/fp32 swap on hand-made words (the GPU's canonical NaN 0x7FFFFFFF, its
negative, 0x7F800001, +-0, +-inf, denormals, every high half around the rounding tie),
through every backend this machine has: NaN stays NaN in the model, finite words round to
nearest, and the inverse restores both tensors bit for bit. Also inside ``averaged()``,
and the registered swap op refusing 1-byte floats. (The Triton kernel is checked on the
same words in triton_interpreter_cases.py.)"""

import pytest
import torch
from _extension_cases import require_backend
from _grid import simulated_grid

import belay_kernels as bk
from belay_kernels import ops
from belay_kernels.testing import check_packed_swap, packed_swap_case

pytestmark = pytest.mark.filterwarnings("ignore")


def _flat(backend):
    return lambda w, s, inverse: ops.swap_(w, s, inverse=inverse, backend=backend)


def _listed(backend, parts=(7, 1, 1000)):
    """The same words through the foreach path, cut into unaligned pieces."""

    def swap(w, s, inverse):
        bounds = [0, *torch.tensor(parts).cumsum(0).tolist(), w.numel()]
        pieces = list(zip(*((w[a:b], s[a:b]) for a, b in zip(bounds, bounds[1:]))))
        ops.swap_(list(pieces[0]), list(pieces[1]), inverse=inverse, backend=backend)

    return swap


@pytest.mark.parametrize("path", [_flat, _listed], ids=["flat", "list"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_packed_swap_keeps_nan_and_restores_bits(backend, path):
    if backend != "torch":
        require_backend(backend)
    check_packed_swap(*packed_swap_case(), path(backend))


@pytest.mark.parametrize("path", [_flat, _listed], ids=["flat", "list"])
def test_packed_swap_on_the_simulated_cuda_grid(path):
    require_backend("cpp")
    with simulated_grid(3, 32):
        check_packed_swap(*packed_swap_case(), path("cpp"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_nan_stays_nan_inside_averaged(backend):
    if backend != "torch":
        require_backend(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    ema = bk.EMA(model, decay=0.9, backend=backend)
    words = {  # first elements of the first weight's shadow
        0: 0x7FFFFFFF,
        1: 0xFFFFFFFF,
        2: 0x7F800001,
        3: 0x7FC00000,
        4: 0x7F800000,
    }
    shadow = ema.shadow_params()[0].view(-1).view(torch.int32)
    for i, word in words.items():
        shadow[i] = word - 2**32 if word >= 2**31 else word
    live = [p.detach().clone() for p in model.parameters()]
    saved = [s.clone() for s in ema.shadow_params()]
    with ema.averaged():
        seen = model[0].weight.detach().view(-1).float()
        assert torch.isnan(seen[:4]).all(), seen[:5]
        assert seen[4] == float("inf")
        assert torch.isfinite(seen[5:]).all()
    for p, before in zip(model.parameters(), live):
        assert torch.equal(p.detach().view(torch.int16), before.view(torch.int16))
    for s, before in zip(ema.shadow_params(), saved):
        assert torch.equal(s.view(torch.int32), before.view(torch.int32))


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("op", ["swap_", "swap_foreach_"])
def test_registered_swap_refuses_one_byte_floats(op, dtype):
    require_backend("cpp")
    weights = torch.zeros(64, dtype=torch.uint8).view(dtype)
    shadow = torch.ones(64, dtype=torch.uint8).view(dtype)
    args = (weights, shadow) if op == "swap_" else ([weights], [shadow])
    with pytest.raises(ValueError, match="no exact in-place swap for Float8"):
        getattr(torch.ops.belay_kernels, op)(*args, False)
    assert torch.equal(weights.view(torch.uint8), torch.zeros(64, dtype=torch.uint8))
    assert torch.equal(shadow.view(torch.uint8), torch.ones(64, dtype=torch.uint8))
