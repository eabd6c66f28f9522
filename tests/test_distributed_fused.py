"""``fuse`` on real process groups (gloo, CPU): FSDP2's local shards, with and without a
``MixedPrecisionPolicy`` (bf16 compute, fp32 sharded parameters), and DDP. On every rank
the fused optimizer leaves the same bits as ``torch.optim.AdamW(foreach=False)`` followed
by the averager's ``step()``, in the weights and the shadow, and its ``state_dict()`` is
torch's own (DTensor moments under FSDP2)."""

import torch
from _distributed import run_ranks
from _distributed_models import batch, local, tiny
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import belay_kernels as bk

STEPS = 6


def _step(model, optimizer, t, rank, averager=None, per_rank_data=False):
    tokens, target = batch(t * 2 + rank if per_rank_data else t)
    loss = nn.functional.cross_entropy(model(tokens).float().flatten(0, 1), target.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if averager is not None:
        averager.step()


def _averager(name, model):
    if name == "ema":
        return bk.EMA(model, decay=0.9, include_frozen=False)
    return bk.Belay(model, alpha=0.1, beta=0.05, include_frozen=False)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _bits(t):
    return local(t).detach().contiguous().view(-1).view(torch.uint8).clone()


def fsdp_ranks(rank, world, averager_name, mixed):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else None
    results = []
    for fused in (False, True):
        model = tiny(shard=True, mp_policy=policy)
        averager = _averager(averager_name, model)
        optimizer = torch.optim.AdamW(_trainable(model), lr=0.01, weight_decay=0.1, foreach=False)
        if fused:
            optimizer = bk.fuse(optimizer, averager)
        for t in range(STEPS):
            _step(model, optimizer, t, rank, None if fused else averager)
        state = optimizer.state_dict()["state"]
        moments = [type(s["exp_avg"]).__name__ for s in state.values()]
        results.append(
            (
                [_bits(p) for p in model.parameters()]
                + [_bits(s) for s in averager.shadow_params()],
                moments,
            )
        )
    (plain, plain_moments), (ours, our_moments) = results
    assert our_moments == plain_moments and set(our_moments) == {"DTensor"}
    return all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))


def test_fused_on_fsdp2_local_shards_matches_unfused():
    assert run_ranks(fsdp_ranks, 2, "ema", False) == [True, True]
    assert run_ranks(fsdp_ranks, 2, "belay", False) == [True, True]


def test_fused_with_fsdp2_mixed_precision_matches_unfused():
    assert run_ranks(fsdp_ranks, 2, "ema", True) == [True, True]


def ddp_ranks(rank, world):
    results = []
    for fused in (False, True):
        model = tiny()
        averager = _averager("ema", model)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(_trainable(ddp), lr=0.01, foreach=False)
        if fused:
            optimizer = bk.fuse(optimizer, averager)
        for t in range(STEPS):
            _step(ddp, optimizer, t, rank, None if fused else averager, per_rank_data=True)
        results.append(
            [_bits(p) for p in model.parameters()] + [_bits(s) for s in averager.shadow_params()]
        )
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_fused_under_ddp_matches_unfused():
    assert run_ranks(ddp_ranks, 2) == [True, True]
