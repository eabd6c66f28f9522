"""Post-hoc EMA on an FSDP2 model: every rank tracks the EMA profiles of its own shards and
writes them into sharded snapshots off the training thread; a checkpoint and resume keep
the snapshot numbering; after training the EMA of any length is reconstructed, each rank
summing only its own chunks.

    torchrun --nproc_per_node 2 examples/fsdp2_posthoc.py

Runs on CPU (gloo) or GPUs (nccl), on the synthetic task of ``fsdp2_ema.py`` (nothing is
downloaded). Afterwards, in one process and without torch.distributed:

    belay-kernels posthoc OUT/snapshots --sigma-rel 0.05 0.08 0.12 --out OUT/weights --plot OUT/moves.png
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# the model, data and training loop of fsdp2_ema.py: its build() and train() take any averager
from fsdp2_ema import TinyLM, evaluate, train
from fsdp2_ema import build as build_sharded

import belay_kernels as bk
from belay_kernels import posthoc


def build(snapshots):
    # the profiles cover this rank's shards; every 10th step stages a copy, and a thread
    # writes the shards
    return build_sharded(
        lambda model: bk.PostHocEMA(
            model, sigma_rels=(0.05, 0.10), snapshot_every=10, snapshot_dir=snapshots
        )
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60, help="steps before and after resuming")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    holder = [args.out or (tempfile.mkdtemp(prefix="fsdp2-posthoc-") if rank == 0 else None)]
    dist.broadcast_object_list(holder)
    out = holder[0]
    snapshots = os.path.join(out, "snapshots")

    model, optimizer, phema = build(snapshots)
    train(model, optimizer, phema, args.steps, 0, rank)
    checkpoint = os.path.join(out, "checkpoint")
    # the averager's state_dict() waits for the snapshot in flight, so the checkpoint never
    # counts a snapshot that is not on disk
    dcp.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict(), "phema": phema},
        checkpoint_id=checkpoint,
    )

    # a fresh process would start here: the same objects, then the checkpoint loaded
    model, optimizer, phema = build(snapshots)
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "phema": phema}
    dcp.load(state, checkpoint_id=checkpoint)
    optimizer.load_state_dict(state["optim"])
    loss = train(model, optimizer, phema, args.steps, args.steps, rank)
    phema.wait()  # the last snapshot is on disk (a failed write would raise here)

    # any EMA length, after the fact: each rank reads and sums only its own chunks
    weights = posthoc.reconstruct(snapshots, sigma_rel=0.08, process_group=dist.group.WORLD)
    posthoc.write_dcp(weights, os.path.join(out, "ema-0.08"))  # sharded, as it is
    exported = os.path.join(out, "ema-0.08.pt")
    whole = posthoc.export(weights, exported)  # gathered on every rank, written by rank 0
    plain = TinyLM()
    plain.load_state_dict(whole)  # a plain model: no FSDP, no torch.distributed needed
    live, averaged = evaluate(model, rank), evaluate(plain, rank)
    if rank == 0:
        print(f"trained {phema.num_steps} steps (resumed at {args.steps}): train loss {loss:.3f}")
        print(f"{phema.num_snapshots} sharded snapshots in {snapshots}")
        print(f"eval loss: live weights {live:.3f}, post-hoc EMA sigma_rel 0.08 {averaged:.3f}")
        print(f"wrote {exported} and the sharded checkpoint {os.path.join(out, 'ema-0.08')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
