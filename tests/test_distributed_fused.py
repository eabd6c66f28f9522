"""``fuse`` on real process groups (gloo, CPU): FSDP2's local shards, with and without a
``MixedPrecisionPolicy`` (bf16 compute, fp32 sharded parameters), and DDP. On every rank
the fused optimizer leaves the same bits as ``torch.optim.AdamW(foreach=False)`` followed
by the averager's ``step()``, in the weights and the shadow, where the compiled kernels
give torch's bits (``_fused_exactness``; else within the bound of ``test_fused``), and its
``state_dict()`` is torch's own (DTensor moments under FSDP2)."""

import torch
from _distributed import run_ranks
from _distributed_models import batch, local, tiny
from _fused_exactness import compiled_is_exact
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


def _local_copy(t):
    return local(t).detach().clone()


def _compare(results, backend) -> None:
    """Each rank's (unfused, fused) tensors: bit for bit where the backend gives torch's
    bits for fp32 AdamW, else within 16 fp32 ulps (an ulp of sqrt, grown over the steps)."""
    exact = backend != "cpp" or compiled_is_exact("adam", torch.float32, coupled_decay=False)
    for plain, ours in results:
        for a, b in zip(plain, ours, strict=True):
            if exact:
                assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
            else:
                eps = 16 * torch.finfo(torch.float32).eps
                torch.testing.assert_close(a.double(), b.double(), rtol=eps, atol=eps)


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
        tensors = list(model.parameters()) + list(averager.shadow_params())
        results.append(([_local_copy(t) for t in tensors], moments))
    (plain, plain_moments), (ours, our_moments) = results
    assert our_moments == plain_moments and set(our_moments) == {"DTensor"}
    return plain, ours, _backend_of(optimizer)


def _backend_of(fused) -> str:
    return fused._buckets[0][0].module.__name__.rsplit(".", 1)[-1]


def _check(results) -> None:
    _compare([(plain, ours) for plain, ours, _ in results], results[0][2])


def test_fused_on_fsdp2_local_shards_matches_unfused():
    _check(run_ranks(fsdp_ranks, 2, "ema", False))
    _check(run_ranks(fsdp_ranks, 2, "belay", False))


def test_fused_with_fsdp2_mixed_precision_matches_unfused():
    _check(run_ranks(fsdp_ranks, 2, "ema", True))


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
        tensors = list(model.parameters()) + list(averager.shadow_params())
        results.append([_local_copy(t) for t in tensors])
    return results[0], results[1], _backend_of(optimizer)


def test_fused_under_ddp_matches_unfused():
    _check(run_ranks(ddp_ranks, 2))
