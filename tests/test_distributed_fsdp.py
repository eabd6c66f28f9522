"""Every averager on an FSDP2 (fully_shard) model, on 2 real gloo ranks: each rank's
local shadow against a float64 oracle of its own shards, the gathered shadow against a
single-process run, no collective and no DTensor dispatch in step(), the in-place swap,
export, copy_to, mixed precision, and bad input.

The checks of one world run in one set of processes (starting them is what costs time)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from _distributed_models import (
    AVERAGERS,
    KIND,
    STEPS,
    Oracle,
    check_bad_state_refused_untouched,
    check_shadow_params_like_the_parameters,
    local,
    named_local,
    tiny,
    train_step,
)
from torch.utils._python_dispatch import TorchDispatchMode

import belay_kernels as bk
from belay_kernels import distributed as bkd
from belay_kernels.testing import assert_close


def _full(value):
    return value.full_tensor() if bkd.is_dtensor(value) else value


def check_averager_against_oracle_and_single_process(key, rank):
    cls, settings = AVERAGERS[key]
    model, single = tiny(shard=True), tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.2)
    avg, avg_single = cls(model, **settings), cls(single, **settings)
    names = avg.names()
    buffers = [n for n, _ in model.named_buffers()]
    oracle = Oracle(key, settings, names, named_local(model), buffers)
    for t in range(STEPS):
        train_step(model, opt, t)
        train_step(single, opt_single, t)
        before = {n: v.clone() for n, v in named_local(model).items()}
        avg.step()
        avg_single.step()
        pulled = oracle.step(t, before)
        for n, expected in pulled.items():  # BELAY also moves the weights
            assert_close(named_local(model)[n], expected, f"{key} rank {rank} weights {n} step {t}")
    # one launch for the local shards (one list, one dtype), one for the buffers, which
    # FSDP2 leaves whole and so live in a flat buffer
    assert avg.launches_per_step == 2
    for n, s in zip(names, avg.shadow_params()):
        assert_close(local(s), oracle.state[n], f"{key} rank {rank} local shadow {n}")
    check_shadow_params_like_the_parameters(avg, model, KIND[key], f"{key} rank {rank}")
    check_bad_state_refused_untouched(avg, KIND[key], f"{key} rank {rank}")
    state = avg.state_dict()
    single_shadow = dict(zip(names, avg_single.shadow_params()))
    for n in names:
        full = _full(state[KIND[key]][n])
        assert_close(full, single_shadow[n], f"{key} rank {rank} gathered shadow {n}")


class DTensorOps(TorchDispatchMode):
    """Records every op that reaches dispatch with a DTensor argument."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(bkd.is_dtensor(a) for a in flat):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def check_no_collective_and_no_dtensor_dispatch(rank):
    """Rank 1 waits on the store (not a collective) while rank 0 steps: a collective in
    step() would hang rank 0 until the harness's timeout."""
    model = tiny(shard=True)
    averagers = [cls(model, **settings) for cls, settings in AVERAGERS.values()]
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        with DTensorOps() as control:  # the detector sees DTensor ops when there are some
            model.embed.weight.mul(1.0)
        assert control.seen, "the dispatch detector saw nothing"
        with DTensorOps() as mode:
            for avg in averagers:
                for _ in range(3):
                    avg.step()
                with avg.averaged():
                    pass
        assert not mode.seen, f"DTensor dispatch in step()/averaged(): {mode.seen[:5]}"
        store.set("rank0_done", "1")
    else:
        store.wait(["rank0_done"])
    dist.barrier()


def check_swap_export_and_copy_to(rank, tmp):
    from _distributed_models import batch

    model = tiny(shard=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ema = bk.EMA(model, decay=0.8)
    for t in range(5):
        train_step(model, opt, t)
        ema.step()
    model.eval()
    tokens, _ = batch(99)
    live_before = {n: v.clone() for n, v in named_local(model).items()}
    out_live = model(tokens)
    with ema.averaged():
        out_avg = model(tokens)
    out_live_after = model(tokens)
    model.reshard()  # the root stays unsharded after a forward without backward
    for n, v in named_local(model).items():
        assert torch.equal(v, live_before[n]), f"rank {rank}: {n} not restored bit-exactly"
    assert torch.equal(out_live, out_live_after), "a forward after averaged() saw stale weights"
    path = tmp / "averaged.pt"
    exported = bkd.export_averaged(ema, path)
    dist.barrier()
    plain = tiny(seed=5)
    plain.load_state_dict(torch.load(path))  # no torch.distributed involved
    plain.eval()
    assert set(exported) == set(plain.state_dict())
    assert_close(out_avg, plain(tokens), f"rank {rank}: averaged() forward vs exported model")
    # copy_to: a target sharded alike (local copies) and a whole model (gathered)
    target = tiny(seed=3, shard=True)
    ema.copy_to(target)
    for n, s in zip(ema.names(), ema.shadow_params()):
        assert torch.equal(named_local(target)[n], local(s)), f"copy_to sharded {n}"
    whole = tiny(seed=4)
    ema.copy_to(whole)
    for n, t in whole.state_dict().items():
        if n in ema.names():
            assert torch.equal(t, exported[n]), f"copy_to whole {n}"


def check_mixed_precision(rank):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = tiny(shard=True, mp_policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ema = bk.EMA(model, decay=0.9)
    params = dict(model.named_parameters())
    oracle = {n: named_local(model)[n].double() for n in ema.names()}
    for t in range(10):
        train_step(model, opt, t)
        ema.step()
        oracle = {n: s + 0.1 * (named_local(model)[n].double() - s) for n, s in oracle.items()}
    for n, s in zip(ema.names(), ema.shadow_params()):
        if n in params:
            assert params[n].dtype == torch.float32 and s.dtype == torch.float32
        assert_close(local(s), oracle[n], f"mixed precision shadow {n}")


def check_bad_input(rank, tmp):
    from _distributed_models import Tiny
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    # built before fully_shard: stale, and the message says to build it after
    torch.manual_seed(0)
    model = Tiny()
    ema = bk.EMA(model)
    fully_shard(model)
    shadow = [s.clone() for s in ema.shadow_params()]
    weights = {n: v.clone() for n, v in named_local(model).items()}
    for call in (ema.step, lambda: ema.averaged().__enter__(), lambda: ema.copy_to(tiny())):
        with pytest.raises(bk.BelayInputError, match="built before fully_shard.*after fully_shard"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(shadow, ema.shadow_params()))
    assert all(torch.equal(v, weights[n]) for n, v in named_local(model).items())

    # DTensors on different meshes in one call, and a DTensor beside a plain tensor
    mesh_a = init_device_mesh("cpu", (2,), mesh_dim_names=("a",))
    mesh_b = init_device_mesh("cpu", (1, 2), mesh_dim_names=("x", "y"))
    x = distribute_tensor(torch.ones(6, 3), mesh_a, [Shard(0)])
    y = distribute_tensor(torch.ones(6, 3), mesh_b, [Shard(0), Shard(0)])
    sx, sy = x.clone() * 2, y.clone() * 2
    with pytest.raises(bk.BelayInputError, match="one device mesh"):
        bk.ops.ema_update_([sx, sy], [x, y], decay=0.5)
    with pytest.raises(bk.BelayInputError, match="is a DTensor but weights is a plain tensor"):
        bk.ops.ema_update_(sx, torch.ones(3, 3), decay=0.5)
    with pytest.raises(bk.BelayInputError, match="sharded alike"):
        bk.ops.ema_update_(sx, distribute_tensor(torch.ones(6, 3), mesh_a, [Shard(1)]), decay=0.5)
    assert torch.equal(sx.to_local(), 2 * x.to_local()) and torch.equal(
        sy.to_local(), 2 * y.to_local()
    )
    # the same call on one mesh works, on the local shards
    bk.ops.ema_update_(sx, x, decay=0.5)
    assert torch.equal(sx.to_local(), 1.5 * x.to_local())

    # a DCP checkpoint from a different model: names and shapes, nothing loaded
    import torch.distributed.checkpoint as dcp
    from torch import nn

    other = nn.Sequential(nn.Linear(8, 5))
    fully_shard(other)
    dcp.save({"ema": bk.EMA(other)}, checkpoint_id=str(tmp / "other"))
    model = tiny(shard=True)
    ema = bk.EMA(model)
    before = [local(s).clone() for s in ema.shadow_params()]
    with pytest.raises(
        bk.BelayInputError,
        match=r"missing: .*shadow\.embed\.weight \(11, 8\).*unexpected: shadow\.0\.weight \(5, 8\)",
    ):
        bkd.check_checkpoint(ema, tmp / "other", "ema")
    assert all(torch.equal(a, local(b)) for a, b in zip(before, ema.shadow_params()))

    # shard_shadow on an FSDP2 model: already sharded
    with pytest.raises(bk.BelayInputError, match="already sharded"):
        bk.EMA(model, shard_shadow=True)


def fsdp_checks(rank, world, tmp):
    for key in AVERAGERS:
        check_averager_against_oracle_and_single_process(key, rank)
    check_no_collective_and_no_dtensor_dispatch(rank)
    check_swap_export_and_copy_to(rank, tmp)
    check_mixed_precision(rank)
    check_bad_input(rank, tmp)
    return rank


def test_fsdp2_every_averager_on_two_ranks(tmp_path):
    assert run_ranks(fsdp_checks, 2, tmp_path, timeout=150) == [0, 1]
