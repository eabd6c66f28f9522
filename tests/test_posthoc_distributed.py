"""PostHocEMA across processes, on real gloo ranks: FSDP2 profiles over each rank's local
shards against one process on the gathered weights, sharded snapshot folders written by
2 and 4 ranks and reconstructed in 1 process, on 2 ranks and on 4, a damaged shard named,
and one file set per snapshot under DDP."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist
from _distributed import run_ranks
from _distributed_models import tiny, train_step
from torch import nn

import belay_kernels as bk
from belay_kernels import distributed as bkd
from belay_kernels import posthoc

SIGMAS = (0.05, 0.10)
STEPS, EVERY = 24, 6
TARGETS = (0.07, 0.12)


def _whole(value):
    return value.full_tensor() if bkd.is_dtensor(value) else value


def _assert_same(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for n, v in expected.items():
        assert torch.equal(_whole(got[n]), v), f"{what}: {n}"


def fsdp_write(rank, world, tmp):
    """Train the same trajectory sharded and whole; the sharded PostHocEMA writes
    ``fsdp{world}``, the whole one (rank 0) ``single{world}``."""
    model, single = tiny(shard=True), tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.2)
    options = {"sigma_rels": SIGMAS, "snapshot_every": EVERY}
    phema = bk.PostHocEMA(model, snapshot_dir=tmp / f"fsdp{world}", **options)
    ref = bk.PostHocEMA(single, snapshot_dir=tmp / f"single{world}", **options)
    for t in range(STEPS):
        train_step(model, opt, t)
        train_step(single, opt_single, t)
        phema.step()
        ref.step()
    phema.wait()
    ref.wait()
    ours, theirs = phema.state_dict(), ref.state_dict()
    assert ours["num_snapshots"] == theirs["num_snapshots"] == STEPS // EVERY
    for k in range(len(SIGMAS)):
        # each rank's profiles cover its own shards and gather to the single process's
        _assert_same(ours[f"profile_{k}"], theirs[f"profile_{k}"], f"rank {rank} profile {k}")
    dist.barrier()  # rank 0's single-process files are complete
    expected = posthoc.reconstruct(tmp / f"single{world}", sigma_rel=TARGETS[0])
    got = posthoc.reconstruct(tmp / f"fsdp{world}", sigma_rel=TARGETS[0])  # this process alone
    _assert_same(got, expected, f"rank {rank}, one process")
    return rank


def fsdp_read(rank, world, folder, single, out):
    """Reconstruct ``folder`` (written by another number of ranks) on this world's ranks,
    each its own chunks, and save the result both ways."""
    group = dist.group.WORLD
    many = posthoc.reconstruct_many(folder, TARGETS, process_group=group)
    for target, got in zip(TARGETS, many):
        for n, v in got.items():
            if bkd.is_dtensor(v):  # this rank holds only its chunk
                assert v.to_local().shape[0] <= -(-v.shape[0] // world), n
        _assert_same(got, posthoc.reconstruct(single, sigma_rel=target), f"rank {rank} {target}")
    posthoc.write_dcp(many[0], out / f"dcp-on-{world}")
    posthoc.export(many[0], out / f"export-on-{world}.pt")
    return rank


def test_fsdp2_snapshots_reconstruct_on_any_number_of_ranks(tmp_path):
    assert run_ranks(fsdp_write, 2, tmp_path, timeout=180) == [0, 1]
    written = sorted(p.name for p in (tmp_path / "fsdp2").iterdir())
    assert written == [f"snapshot-00000{i}" for i in range(1, 5)]  # nothing left over
    assert (tmp_path / "fsdp2" / "snapshot-000001" / "header.json").is_file()
    expected = posthoc.reconstruct(tmp_path / "single2", sigma_rel=TARGETS[0])
    # one process, no torch.distributed, on snapshots written by 2 ranks
    _assert_same(posthoc.reconstruct(tmp_path / "fsdp2", sigma_rel=TARGETS[0]), expected, "2 -> 1")
    assert run_ranks(fsdp_read, 4, tmp_path / "fsdp2", tmp_path / "single2", tmp_path) == [
        0,
        1,
        2,
        3,
    ]
    _assert_same(torch.load(tmp_path / "export-on-4.pt"), expected, "2 -> 4, exported")
    assert run_ranks(fsdp_write, 4, tmp_path, timeout=240) == [0, 1, 2, 3]
    assert run_ranks(fsdp_read, 2, tmp_path / "fsdp4", tmp_path / "single4", tmp_path) == [0, 1]
    expected = posthoc.reconstruct(tmp_path / "single4", sigma_rel=TARGETS[0])
    _assert_same(torch.load(tmp_path / "export-on-2.pt"), expected, "4 -> 2, exported")
    _assert_same(posthoc.reconstruct(tmp_path / "fsdp4", sigma_rel=TARGETS[0]), expected, "4 -> 1")
    _check_a_flipped_bit_in_a_shard_is_named(tmp_path / "fsdp4", tmp_path / "damaged")


def _check_a_flipped_bit_in_a_shard_is_named(folder, copy):
    shutil.copytree(folder, copy)
    import torch.distributed.checkpoint as dcp

    snap = copy / "snapshot-000003"
    state = {"profile_1": {"body.0.weight": torch.empty(33, 8, dtype=torch.float16)}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(state, checkpoint_id=str(snap), no_dist=True)
    pattern = state["profile_1"]["body.0.weight"][:4].numpy().tobytes()
    hits = []
    for f in sorted(snap.glob("*.distcp")):
        data = bytearray(f.read_bytes())
        at = data.find(pattern)
        if at >= 0:
            hits.append((f, data, at))
    assert len(hits) == 1
    f, data, at = hits[0]
    data[at + 9] ^= 0x04
    f.write_bytes(bytes(data))
    with pytest.raises(
        bk.BelayInputError, match=r"snapshot-000003' is damaged.*'body.0.weight' in profile 1"
    ):
        posthoc.reconstruct(copy, sigma_rel=TARGETS[0])


def ddp_write(rank, world, folder):
    """DDP with a different batch per rank: the parameters agree, the BatchNorm buffers
    do not. A PostHocEMA with whole profiles (rank 0 alone writes files) and one with
    ``shard_shadow=True`` (each rank its dim-0 chunks, into sharded folders)."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    phema = bk.PostHocEMA(model, sigma_rels=SIGMAS, snapshot_every=5, snapshot_dir=folder)
    chunked = bk.PostHocEMA(
        model,
        sigma_rels=SIGMAS,
        snapshot_every=5,
        snapshot_dir=folder / "chunks",
        shard_shadow=True,
    )
    for t in range(20):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(100 * rank + t))
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        phema.step()
        chunked.step()
    phema.wait()
    chunked.wait()
    assert phema.num_snapshots == chunked.num_snapshots == 4
    half = dict(zip(chunked.names(), chunked._saved_tensors()["profile_1"]))["0.weight"]
    assert half.shape == (4, 6)  # this rank's chunk of the 8 x 6 weight's profile
    params = {n for n, _ in model.named_parameters()}
    profiles = {
        kind: [v for n, v in zip(phema.names(), values) if n in params]
        for kind, values in phema._saved_tensors().items()
    }
    return {n: b.clone() for n, b in model.named_buffers()}, profiles


def test_ddp_writes_one_file_set_from_rank_0(tmp_path):
    (buffers0, profiles0), (buffers1, profiles1) = run_ranks(ddp_write, 2, tmp_path, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chunks",
        *(f"snapshot-00000{i}.pt" for i in range(1, 5)),
    ]
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [
        f"snapshot-00000{i}" for i in range(1, 5)
    ]
    for target in TARGETS:  # the chunked snapshots hold what rank 0's files hold
        _assert_same(
            posthoc.reconstruct(tmp_path / "chunks", sigma_rel=target),
            posthoc.reconstruct(tmp_path, sigma_rel=target),
            f"shard_shadow=True, sigma_rel {target}",
        )
    for kind in profiles0:  # the parameters' profiles; the buffers' differ by rank
        assert all(torch.equal(a, b) for a, b in zip(profiles0[kind], profiles1[kind]))
    last = posthoc.read_snapshot(tmp_path / "snapshot-000004.pt")
    assert not torch.equal(buffers0["1.running_mean"], buffers1["1.running_mean"])
    for n, b in buffers0.items():  # the buffers are rank 0's, every run
        assert torch.equal(last["buffers"][n], b), n
