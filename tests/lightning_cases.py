"""Lightning runs shared by tests/test_integration_lightning.py (one process) and
tests/lightning_ddp_script.py (two processes, strategy="ddp"): each check trains a small
regression net and asserts; the same code passes on one process and on two."""

from __future__ import annotations

import json
import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import belay_kernels as bk
from belay_kernels.integrations.lightning import WeightAveraging

DECAY = 0.8
BATCH = 8
N_TRAIN = 64  # 8 batches per epoch on one process, 4 per rank on two


def dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loaders():
    return (
        DataLoader(dataset(N_TRAIN, 1), batch_size=BATCH),
        DataLoader(dataset(32, 2), batch_size=32),
    )


def regression_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


class RegressionSteps:
    """The LightningModule hooks of the regression net in ``self.net``, for Net and for the
    model-parallel script's module, which derives from the other spelling of Lightning."""

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.val_records.append((batch, loss.detach().clone()))
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


class Net(RegressionSteps, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = regression_net()
        self.val_records = []  # (the batch, its loss) for each validation batch


def trainer(**kwargs):
    settings = dict(
        accelerator="cpu",
        devices=int(os.environ.get("BELAY_TEST_DEVICES", "1")),
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    if settings["devices"] > 1:
        settings["strategy"] = "ddp"
    settings.update(kwargs)
    return pl.Trainer(**settings)


class AlignedLightningEMA(EMAWeightAveraging):
    """Lightning's EMA, started from the weights at setup as bk.EMA is: AveragedModel's
    first update copies, so one update at setup makes its average start where ours does."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._average_model.update_parameters(pl_module)


class LiveWeights(pl.Callback):
    """Records the model's live weights at one hook, to show validation gives them back."""

    def __init__(self, hook):
        self.seen = []
        setattr(self, hook, lambda trainer, module: self.seen.append(state(module)))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def shadow(averager):
    return {n: s.detach().clone() for n, s in zip(averager.names(), averager.shadow_params())}


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def check_matches_lightning_ema(accumulate: int) -> dict:
    """Ours and Lightning's EMAWeightAveraging on one run: the same average to fp32 rounding,
    one update per optimizer step."""
    module = Net()
    ours = WeightAveraging(bk.EMA, decay=DECAY)
    theirs = AlignedLightningEMA(decay=DECAY)
    train, _ = loaders()
    # Lightning's callback copies its average into the model at the end; ours keeps it apart.
    t = trainer(callbacks=[ours, theirs], limit_val_batches=0, accumulate_grad_batches=accumulate)
    t.fit(module, train)
    batches_per_epoch = len(t.train_dataloader)
    expected_steps = 2 * -(-batches_per_epoch // accumulate)
    assert t.global_step == expected_steps
    assert ours.averager.num_steps == ours.averager.num_updates == expected_steps
    theirs_avg = dict(theirs._average_model.module.named_parameters())
    worst = 0.0
    for name, value in shadow(ours.averager).items():
        torch.testing.assert_close(value, theirs_avg[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
        worst = max(worst, (value - theirs_avg[name]).abs().max().item())
    return {"steps": expected_steps, "max_abs_diff": worst, "shadow": shadow(ours.averager)}


def check_validation_and_resume(ckpt_dir: str, **averager_kwargs) -> dict:
    """Validation runs on the average and gives the live weights back bit for bit; resuming
    from the checkpoint written after epoch 1 ends bit-identical to the straight run.
    ``averager_kwargs`` go to bk.EMA besides the decay (shard_shadow=True under DDP)."""
    module = Net()
    ours = WeightAveraging(bk.EMA, decay=DECAY, **averager_kwargs)
    before, after = LiveWeights("on_validation_start"), LiveWeights("on_validation_end")
    saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    t = trainer(callbacks=[before, ours, after, saver], enable_checkpointing=True)
    t.fit(module, *loaders())
    assert len(before.seen) == len(after.seen) == 2
    for a, b in zip(before.seen, after.seen):
        assert_equal(a, b)  # validation swapped the average in and the live weights back
    # The last validation ran after the last step: it must have seen the final average.
    batch, logged = module.val_records[-1]
    x, y = batch
    with torch.no_grad():
        live = nn.functional.mse_loss(module(x), y)
        with ours.averager.averaged():
            averaged = nn.functional.mse_loss(module(x), y)
    assert torch.equal(logged, averaged), (logged, averaged)
    assert not torch.equal(logged, live), "the live and averaged losses should differ"
    straight = state(module), shadow(ours.averager), ours.averager.num_steps

    resumed_module = Net()
    resumed = WeightAveraging(bk.EMA, decay=DECAY, **averager_kwargs)
    t = trainer(callbacks=[resumed])
    t.fit(resumed_module, *loaders(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    assert resumed.averager.num_steps == straight[2]
    assert_equal(state(resumed_module), straight[0])
    assert_equal(shadow(resumed.averager), straight[1])
    return {
        "val_loss_averaged": averaged.item(),
        "val_loss_live": live.item(),
        "shadow": straight[1],
        "live": straight[0],
    }


def report_and_leave(result_path: str, result: dict) -> None:
    """Rank 0 writes what the ranks measured to ``result_path``; then every rank leaves."""
    import torch.distributed as dist

    result["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(result, f)
    # Leave together and close the group: a rank that exits with gloo's threads still
    # running can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
