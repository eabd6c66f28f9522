"""DDP with a sharded shadow, and torch.distributed.checkpoint across world sizes, on real
gloo ranks: a checkpoint saved on 2 ranks loads on 1 and on 4, one saved on 4 loads on 2,
and a resumed run matches the uninterrupted one bit for bit at the same world size."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _distributed import run_ranks
from _distributed_models import (
    batch,
    check_bad_state_refused_untouched,
    check_shadow_params_like_the_parameters,
    named_local,
    tiny,
    train_step,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import belay_kernels as bk
from belay_kernels import distributed as bkd


def _full(value):
    return value.full_tensor() if bkd.is_dtensor(value) else value


def full_shadows(averager, kind="shadow") -> dict[str, torch.Tensor]:
    return {n: _full(v).clone() for n, v in averager.state_dict()[kind].items()}


def assert_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ---- DDP ------------------------------------------------------------------------------


def ddp_checks(rank, world):
    model = tiny()
    before = bk.EMA(model, decay=0.9)  # built before wrapping
    ddp = DistributedDataParallel(model)
    wrapped = bk.EMA(ddp, decay=0.9)  # built on the wrapper: names under "module."
    pairs = {  # unsharded -> sharded, same settings
        "ema": (before, bk.EMA(model, decay=0.9, shard_shadow=True)),
        "swa": (bk.SWA(model, start=2), bk.SWA(model, start=2, shard_shadow=True)),
        "two_point": (bk.TwoPoint(model, gap=3), bk.TwoPoint(model, gap=3, shard_shadow=True)),
    }
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    for t in range(20):
        tokens, target = batch(t * world + rank)  # each rank its own data
        loss = nn.functional.cross_entropy(ddp(tokens).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapped.step()
        for plain, sharded in pairs.values():
            plain.step()
            sharded.step()
    assert_equal(
        {n.removeprefix("module."): s for n, s in zip(wrapped.names(), wrapped.shadow_params())},
        dict(zip(before.names(), before.shadow_params())),
        "EMA built on the DDP wrapper vs before wrapping",
    )
    for key, (plain, sharded) in pairs.items():
        kind = "snapshot" if key == "two_point" else "shadow"
        assert_equal(
            full_shadows(sharded, kind), full_shadows(plain, kind), f"{key} sharded vs unsharded"
        )
        check_shadow_params_like_the_parameters(sharded, model, kind, f"{key} sharded")
        check_bad_state_refused_untouched(sharded, kind, f"{key} sharded")
        live = {n: v.clone() for n, v in named_local(model).items()}
        with plain.averaged():
            expected = {n: v.clone() for n, v in named_local(model).items()}
        with sharded.averaged():
            inside = {n: v.clone() for n, v in named_local(model).items()}
        assert_equal(inside, expected, f"{key}: model inside averaged(), sharded vs unsharded")
        assert_equal(named_local(model), live, f"{key}: live weights after averaged()")
        target = tiny(seed=7)
        sharded.copy_to(target)
        assert_equal(named_local(target), expected, f"{key}: copy_to")
    # memory: this rank's dim-0 chunk of every parameter (buffers stay whole), no more
    plain, sharded = pairs["ema"]
    params = {n for n, _ in model.named_parameters()}
    shadows = dict(zip(plain.names(), plain.shadow_params()))
    chunk_elems = sum(
        (t.chunk(world)[rank].numel() if rank < len(t.chunk(world)) else 0)
        if n in params
        else t.numel()
        for n, t in shadows.items()
    )
    assert sharded.state_bytes == 4 * chunk_elems
    param_bytes = 4 * sum(shadows[n].numel() for n in params)
    rows = sum(shadows[n][0].numel() for n in params)
    assert (
        param_bytes / world - 4 * rows
        <= sharded.state_bytes - (plain.state_bytes - param_bytes)
        <= param_bytes / world + 4 * rows
    )
    assert "this rank's 1/world of the shadow" in sharded.memory_report()
    # BELAY moves the weights: a sharded shadow is refused, with nothing touched
    weights = {n: v.clone() for n, v in named_local(model).items()}
    with pytest.raises(bk.BelayInputError, match="Belay cannot keep a sharded shadow"):
        bk.Belay(model, alpha=0.1, beta=0.1, shard_shadow=True)
    assert_equal(named_local(model), weights, "Belay refusal")


# ---- checkpoints ------------------------------------------------------------------------


def _averagers(world):
    """The FSDP2 model with its EMA, and a replicated model with a sharded-shadow EMA."""
    model = tiny(shard=True)
    ddp_model = tiny()
    return (
        model,
        bk.EMA(model, decay=0.9),
        ddp_model,
        bk.EMA(ddp_model, decay=0.9, shard_shadow=True),
    )


def _train(model, ddp_model, ema, ddp_ema, steps, start):
    opt, ddp_opt = (torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, ddp_model))
    for t in range(start, start + steps):
        train_step(model, opt, t)
        train_step(ddp_model, ddp_opt, t)
        ema.step()
        ddp_ema.step()


def _state(model, ema, ddp_model, ddp_ema):
    return {
        "model": model.state_dict(),
        "ema": ema,
        "ddp_model": ddp_model.state_dict(),
        "ddp_ema": ddp_ema,
    }


def save_and_resume(rank, world, tmp):
    model, ema, ddp_model, ddp_ema = _averagers(world)
    _train(model, ddp_model, ema, ddp_ema, 6, 0)
    dcp.save(_state(model, ema, ddp_model, ddp_ema), checkpoint_id=str(tmp / "ckpt2"))
    saved = {"ema": full_shadows(ema), "ddp_ema": full_shadows(ddp_ema)}
    if rank == 0:
        torch.save(saved, tmp / "expected2.pt")
    _train(model, ddp_model, ema, ddp_ema, 6, 6)  # the uninterrupted run
    # resume: fresh objects from other initial weights, loaded from the checkpoint
    torch.manual_seed(1)
    model2, ema2, ddp_model2, ddp_ema2 = _averagers(world)
    with torch.no_grad():
        for p in list(model2.parameters()) + list(ddp_model2.parameters()):
            p.add_(1.0)
    bkd.check_checkpoint(ema2, tmp / "ckpt2", "ema")
    bkd.check_checkpoint(ddp_ema2, tmp / "ckpt2", "ddp_ema")
    dcp.load(_state(model2, ema2, ddp_model2, ddp_ema2), checkpoint_id=str(tmp / "ckpt2"))
    _train(model2, ddp_model2, ema2, ddp_ema2, 6, 6)
    assert ema2.num_steps == ema.num_steps == ddp_ema2.num_steps == 12
    assert_equal(named_local(model2), named_local(model), "resumed FSDP2 model")
    assert_equal(
        dict(zip(ema.names(), ema.shadow_params())),
        dict(zip(ema2.names(), ema2.shadow_params())),
        "resumed FSDP2 EMA, local shards",
    )
    assert_equal(named_local(ddp_model2), named_local(ddp_model), "resumed replicated model")
    assert_equal(full_shadows(ddp_ema2), full_shadows(ddp_ema), "resumed sharded DDP EMA")


def load_elsewhere(rank, world, tmp, src, expected, dst):
    """Load a checkpoint saved at another world size, compare with what was saved, then
    (when ``dst`` is given) take two steps and save again."""
    model, ema, ddp_model, ddp_ema = _averagers(world)
    if world == 4:  # 5 rows over 4 ranks: the last rank's shard is empty
        assert model.gain.to_local().numel() == (0 if rank == 3 else 2 - (rank == 2))
    dcp.load({"ema": ema, "ddp_ema": ddp_ema}, checkpoint_id=str(tmp / src))
    saved = torch.load(tmp / expected)
    assert_equal(full_shadows(ema), saved["ema"], f"FSDP2 EMA on {world} ranks from {src}")
    assert_equal(
        full_shadows(ddp_ema), saved["ddp_ema"], f"sharded DDP EMA on {world} ranks from {src}"
    )
    assert ema.num_steps == ddp_ema.num_steps > 0
    if world == 1:  # and into a plain, unsharded averager with no DTensor at all
        plain = bk.EMA(tiny(), decay=0.9)
        dcp.load({"ema": plain}, checkpoint_id=str(tmp / src))
        assert_equal(dict(zip(plain.names(), plain.shadow_params())), saved["ema"], "plain EMA")
    if dst is not None:
        _train(model, ddp_model, ema, ddp_ema, 2, 100)
        dcp.save({"ema": ema, "ddp_ema": ddp_ema}, checkpoint_id=str(tmp / dst))
        now = {"ema": full_shadows(ema), "ddp_ema": full_shadows(ddp_ema)}
        if rank == 0:
            torch.save(now, tmp / f"expected{world}.pt")
        dist.barrier()
    return rank


def ddp_and_save(rank, world, tmp):
    ddp_checks(rank, world)
    save_and_resume(rank, world, tmp)
    return rank


def test_ddp_sharded_shadow_and_checkpoints_that_reshard(tmp_path):
    run_ranks(ddp_and_save, 2, tmp_path, timeout=150)
    run_ranks(load_elsewhere, 4, tmp_path, "ckpt2", "expected2.pt", "ckpt4", timeout=150)
    run_ranks(load_elsewhere, 1, tmp_path, "ckpt2", "expected2.pt", None, timeout=90)
    run_ranks(load_elsewhere, 2, tmp_path, "ckpt4", "expected4.pt", None, timeout=90)


def test_shard_shadow_needs_a_process_group():
    model = nn.Linear(4, 3)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        bk.BelayInputError, match="torch.distributed is not initialised.*init_process_group"
    ):
        bk.EMA(model, shard_shadow=True)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(not hasattr(p, "_belay_flat_group") for p in model.parameters())
