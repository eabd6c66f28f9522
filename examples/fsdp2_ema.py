"""Train a small transformer with FSDP2 and an EMA, checkpoint with
torch.distributed.checkpoint, resume, and evaluate with the averaged weights.

    torchrun --nproc_per_node 2 examples/fsdp2_ema.py

Runs on CPU (gloo) or GPUs (nccl). The task is synthetic (predict the next token of a
noisy repeating sequence), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import belay_kernels as bk
from belay_kernels import distributed as bkd

VOCAB, CONTEXT = 64, 32


class TinyLM(nn.Module):
    def __init__(self, width=96, depth=3, heads=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(CONTEXT, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.norm(x) @ self.embed.weight.T  # output head tied to the embedding


def batch(step, rank, size=16):
    """Every rank its own batch: a shifted repeating pattern with 10% noise tokens."""
    g = torch.Generator().manual_seed(step * 1000 + rank)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    seq = (start + torch.arange(CONTEXT + 1) * 3) % VOCAB
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=g), seq)
    return seq[:, :-1], seq[:, 1:]


def loss_of(model, tokens, target):
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())


def build(averager=lambda model: bk.EMA(model, decay=0.98)):
    """The sharded model, its optimizer and ``averager(model)``, the averager built after
    fully_shard, like the optimizer."""
    torch.manual_seed(0)
    model = TinyLM()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, optimizer, averager(model)


def train(model, optimizer, ema, steps, start, rank):
    model.train()
    for step in range(start, start + steps):
        loss = loss_of(model, *batch(step, rank))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step()  # this rank's shards only: no communication
    return loss.item()


@torch.no_grad()
def evaluate(model, rank):
    model.eval()
    losses = [loss_of(model, *batch(10_000 + i, rank)) for i in range(4)]
    total = torch.stack(losses).mean().reshape(1)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--steps", type=int, default=60, help="steps before and after the checkpoint"
    )
    parser.add_argument(
        "--out", default=None, help="checkpoint directory (default: a temporary one)"
    )
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    out = args.out or (tempfile.mkdtemp(prefix="fsdp2-ema-") if rank == 0 else None)
    holder = [out]
    dist.broadcast_object_list(holder)
    out = holder[0]

    model, optimizer, ema = build()
    loss = train(model, optimizer, ema, args.steps, 0, rank)
    checkpoint = os.path.join(out, "step-checkpoint")
    dcp.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict(), "ema": ema},
        checkpoint_id=checkpoint,
    )
    if rank == 0:
        print(f"step {args.steps}: train loss {loss:.3f}; saved {checkpoint}")

    # a fresh process would start here: build the same objects, then load into them
    model, optimizer, ema = build()
    bkd.check_checkpoint(ema, checkpoint, "ema")  # a clear error if it is another model's
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "ema": ema}
    dcp.load(state, checkpoint_id=checkpoint)
    optimizer.load_state_dict(state["optim"])
    loss = train(model, optimizer, ema, args.steps, args.steps, rank)

    live = evaluate(model, rank)
    with ema.averaged():  # the EMA's shards swapped in, in place; swapped back after
        averaged = evaluate(model, rank)
    exported = os.path.join(out, "ema-weights.pt")
    bkd.export_averaged(ema, exported)  # a plain state_dict file, written by rank 0
    if rank == 0:
        print(f"resumed to step {ema.num_steps}: train loss {loss:.3f}")
        print(f"eval loss: live weights {live:.3f}, EMA weights {averaged:.3f}")
        print(ema.memory_report())
        plain = TinyLM()
        plain.load_state_dict(torch.load(exported))  # no torch.distributed needed
        print(
            f"exported the EMA weights to {exported} ({sum(p.numel() for p in plain.parameters())} parameters)"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
