"""Averaging time per optimizer step inside Lightning: belay_kernels' WeightAveraging(bk.EMA)
against Lightning's own EMAWeightAveraging, both attached to the same fit of the
GPT-2-small-like model (124M fp32 parameters, belay_kernels/benchmark/architectures.py),
so both average the same weights at the same steps.

Each callback's on_train_batch_end is timed (on the CPU every op is synchronous, so the
wall time is the averaging's cost); the first step of each is dropped (allocation, first
touch). Run once at one thread and once at torch's default thread count:

    python bench/bench_lightning_overhead.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import belay_kernels as bk
from belay_kernels.benchmark.architectures import build
from belay_kernels.integrations.lightning import WeightAveraging


def timed(cls):
    class Timed(cls):
        def on_train_batch_end(self, *args, **kwargs):
            start = time.perf_counter()
            super().on_train_batch_end(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)

    Timed.__name__ = cls.__name__
    return Timed


class LM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = build("gpt2_small_like", torch.float32, torch.device("cpu"))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)  # small state: the machine is small


def run(steps: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    tokens = torch.randint(0, 50257, (steps, 17), generator=torch.Generator().manual_seed(0))
    ours = timed(WeightAveraging)(bk.EMA, decay=0.999)
    theirs = timed(EMAWeightAveraging)(decay=0.999)
    ours.seconds, theirs.seconds = [], []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ours, theirs],
    )
    trainer.fit(LM(), DataLoader(TensorDataset(tokens), batch_size=1))
    mine, peer = statistics.median(ours.seconds[1:]), statistics.median(theirs.seconds[1:])
    return {
        "threads": torch.get_num_threads(),
        "steps timed": len(ours.seconds) - 1,
        "belay_kernels WeightAveraging(EMA) ms": mine * 1e3,
        "Lightning EMAWeightAveraging ms": peer * 1e3,
        "ratio": peer / mine,
        "backend": bk.backends()["cpp"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    for threads in (1, default_threads):
        result = run(args.steps, threads)
        print(
            " | ".join(
                f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
