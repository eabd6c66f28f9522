"""Flat buffers align every view to 16 bytes, as separate tensors would be, so the user's
optimizer and matmuls see the same inputs with and without flattening; the padding is
invisible: not in the model, not in the averager's state, never counted as non-finite."""

import pytest
import torch
from torch import nn

import belay_kernels as bk


def odd_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(7, 10), nn.Tanh(), nn.Linear(10, 3), nn.Tanh(), nn.Linear(3, 5)
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_flat_view_is_16_byte_aligned(dtype):
    model = odd_model(dtype)
    ema = bk.EMA(model)
    assert ema.launches_per_step == 1  # one flat buffer holds them all
    for name, p in model.named_parameters():
        assert p.data_ptr() % 16 == 0, name
    for name, s in zip(ema.names(), ema.shadow_params()):
        assert s.data_ptr() % 16 == 0, name


def test_padding_is_not_state_and_never_counted_as_nonfinite():
    model = odd_model()
    ema = bk.EMA(model, decay=0.5)
    n = sum(p.numel() for p in model.parameters())
    buffer = ema._tracks[0].weights
    assert buffer.numel() > n  # the odd sizes do need padding
    assert ema.state_bytes == 4 * n
    assert set(ema.state_dict()["shadow"]) == {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        model[2].bias[1] = float("nan")
        model[4].weight[0, 0] = float("inf")
    ema.step()
    assert ema.num_skipped == 2
    with ema.averaged():
        pass
    assert torch.count_nonzero(ema._tracks[0].shadow.isnan()) == 0


@pytest.mark.parametrize("optimizer", ["adamw_foreach", "adamw_loop", "sgd"])
def test_training_is_bit_identical_with_and_without_flattening(optimizer):
    make = {
        "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        "adamw_loop": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    }[optimizer]
    runs = []
    for flatten in (True, False):
        model = odd_model()
        opt = make(model.parameters())
        ema = bk.Belay(model, alpha=0.1, beta=0.05, flatten=flatten)
        g = torch.Generator().manual_seed(3)
        for _ in range(12):
            x = torch.randn(33, 7, generator=g)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.step()
        runs.append([p.detach().clone() for p in model.parameters()] + ema.shadow_params())
    for a, b in zip(*runs):
        assert torch.equal(a, b)
