"""The Lightning callback under ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in
``configure_model``) on two CPU processes (gloo).

Run by tests/test_integration_lightning.py as ``python
tests/lightning_model_parallel_script.py RESULT_JSON WORK_DIR CHECK`` in two processes
with torchrun's environment (LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR/PORT); CHECK is
``ema`` or ``posthoc``. The test waits with a timeout and kills the process group when it
expires, so a hung collective fails the test rather than hanging CI.

ModelParallelStrategy runs on the CPU as it is: ``accelerator="cpu"`` makes the process
group gloo. Its default mesh is ``data_parallel_size=num_nodes`` (1) by
``tensor_parallel_size=devices`` (2), meant for tensor parallelism on one node; FSDP2 over
both processes needs ``data_parallel_size=2, tensor_parallel_size=1``, and
``fully_shard`` on the mesh's ``"data_parallel"`` dimension.

Each rank records the local shards and the gathered weights after every optimizer step,
and checks the callback's averager against averages of those computed here: its local
shadow against one of its own shards, the gathered state against one of the whole
weights. Validation must have run on the average and given the live shards back. Then
a run of one epoch saves a checkpoint (Lightning's distributed checkpoint, a folder) and a
new Trainer resumes from it: it must end where the straight run did, bit for bit on every
rank, with PostHocEMA's snapshots numbered on. Lightning writes the callbacks' states from
rank 0 alone, so this holds only because the callback saves a sharded average gathered
whole. Rank 0 writes what it measured to RESULT_JSON.
"""

import sys
from pathlib import Path

import lightning.pytorch as L
import lightning_cases as cases
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import belay_kernels as bk
from belay_kernels import posthoc, power
from belay_kernels.integrations.lightning import WeightAveraging

EPOCHS = 2
STEPS = EPOCHS * cases.N_TRAIN // cases.BATCH // 2  # 4 batches per rank per epoch
SIGMA_RELS = (0.05, 0.10)
SNAPSHOT_EVERY = 3


def local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_state(module: nn.Module) -> dict:
    return {n: local(p).detach().clone() for n, p in module.named_parameters()}


def assert_equal(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name, value in got.items():
        assert torch.equal(value, expected[name]), f"{what}: {name} differs"


class ShardedNet(cases.RegressionSteps, L.LightningModule):
    """cases.Net's regression net, sharded by FSDP2 over both ranks. The 16 x 1 output layer
    leaves rank 1 an empty shard of its weight. Records the weights at the start of
    training and after each optimizer step, local and gathered."""

    def __init__(self):
        super().__init__()
        self.net = cases.regression_net()
        self.local_trajectory = []
        self.full_trajectory = []
        self.val_records = []  # (the batch, its loss) for each validation batch

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def record(self):
        self.local_trajectory.append(local_state(self))
        self.full_trajectory.append(  # every rank gathers: full_tensor() is a collective
            {n: full(p).detach().clone() for n, p in self.named_parameters()}
        )

    def on_train_start(self):
        self.record()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.record()


class LiveShards(L.Callback):
    """The rank's live shards at one hook, to show validation gives them back."""

    def __init__(self, hook):
        self.seen = []
        setattr(self, hook, lambda trainer, module: self.seen.append(local_state(module)))


def fit(averaging: WeightAveraging, epochs=EPOCHS, ckpt_dir=None, ckpt_path=None):
    """Train ``epochs`` epochs (from ``ckpt_path`` if given), saving a checkpoint after each
    epoch into ``ckpt_dir`` if given (Lightning's distributed checkpoint: a folder)."""
    module = ShardedNet()
    before, after = LiveShards("on_validation_start"), LiveShards("on_validation_end")
    callbacks = [before, averaging, after]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, *cases.loaders(), ckpt_path=ckpt_path)
    steps = epochs * STEPS // EPOCHS
    assert trainer.global_step == averaging.averager.num_steps == steps
    assert all(isinstance(p, DTensor) for p in module.parameters()), "the model is not sharded"
    assert len(before.seen) == len(after.seen) > 0
    for i, (a, b) in enumerate(zip(before.seen, after.seen)):
        assert_equal(a, b, f"live shards around validation {i}")
    if ckpt_path is None:
        assert len(module.local_trajectory) == steps + 1
        assert_equal(local_state(module), module.local_trajectory[-1], "live shards after fit")
    return module, trainer


def fit_resumed(make_averaging, work_dir: Path) -> tuple[ShardedNet, WeightAveraging]:
    """One epoch with a checkpoint after it, then a new Trainer resuming from it to the
    end."""
    fit(make_averaging(), epochs=1, ckpt_dir=work_dir / "ckpt")
    resumed = make_averaging()
    module, _ = fit(resumed, ckpt_path=work_dir / "ckpt" / "epoch=0.ckpt")
    return module, resumed


def assert_resumed_as_straight(module, resumed, straight_module, straight, kinds) -> None:
    """The resumed run ends where the straight one did, on every rank, bit for bit."""
    assert_equal(local_state(module), local_state(straight_module), "live shards after resume")
    got_state, expected_state = resumed.averager.state_dict(), straight.averager.state_dict()
    assert got_state["num_steps"] == expected_state["num_steps"]
    for kind in kinds:
        got = {n: local(v) for n, v in got_state[kind].items()}
        expected = {n: local(v) for n, v in expected_state[kind].items()}
        assert_equal(got, expected, f"{kind} after resume")


def check_validation_ran_on_the_average(module: ShardedNet, averager) -> dict:
    """The last validation came after the last step: its losses are the final average's.
    Every rank runs the forward passes (FSDP2 gathers the weights in them)."""
    (x, y), logged = module.val_records[-1]
    with torch.no_grad():
        live = nn.functional.mse_loss(module(x), y)
        with averager.averaged():
            averaged = nn.functional.mse_loss(module(x), y)
    assert torch.equal(logged, averaged), (logged, averaged)
    assert not torch.equal(logged, live), "the live and averaged losses should differ"
    return {"val_loss_averaged": averaged.item(), "val_loss_live": live.item()}


def ema_of(trajectory: list[dict], decays) -> dict:
    """The EMA of ``trajectory`` (start, then one entry per update), ``decays[n - 1]`` the
    decay of update n."""
    average = {n: w.clone() for n, w in trajectory[0].items()}
    for weights, decay in zip(trajectory[1:], decays):
        for n, w in weights.items():
            average[n].lerp_(w, 1 - decay)
    return average


def check_ema(work_dir: Path) -> dict:
    def make_averaging():
        return WeightAveraging(bk.EMA, decay=cases.DECAY)

    averaging = make_averaging()
    module, _ = fit(averaging)
    averager = averaging.averager
    decays = [cases.DECAY] * STEPS
    mine = dict(zip(averager.names(), map(local, averager.shadow_params())))
    assert_equal(mine, ema_of(module.local_trajectory, decays), "local shadow")
    gathered = {n: full(v) for n, v in averager.state_dict()["shadow"].items()}
    assert_equal(gathered, ema_of(module.full_trajectory, decays), "gathered shadow")
    result = {"steps": averager.num_steps, **check_validation_ran_on_the_average(module, averager)}

    resumed_module, resumed = fit_resumed(make_averaging, work_dir)
    assert_resumed_as_straight(resumed_module, resumed, module, averaging, ["shadow"])
    return result


def check_posthoc(work_dir: Path) -> dict:
    def make_averaging(folder):
        return WeightAveraging(
            bk.PostHocEMA,
            sigma_rels=SIGMA_RELS,
            snapshot_every=SNAPSHOT_EVERY,
            snapshot_dir=folder,
            snapshot_dtype=torch.float32,
        )

    snapshot_dir = work_dir / "snapshots"
    averaging = make_averaging(snapshot_dir)
    module, _ = fit(averaging)
    averager = averaging.averager
    assert averager.num_snapshots == STEPS // SNAPSHOT_EVERY
    state = averager.state_dict()
    for k, gamma in enumerate(averager.gammas):
        decays = [power.decay(n, gamma) for n in range(1, STEPS + 1)]
        profile = {n: local(v) for n, v in state[f"profile_{k}"].items()}
        assert_equal(profile, ema_of(module.local_trajectory, decays), f"local profile {k}")
    result = {"steps": averager.num_steps, **check_validation_ran_on_the_average(module, averager)}

    # The snapshots against those of a PostHocEMA on an unsharded net driven by hand over
    # the gathered trajectory: the same steps and the same reconstruction.
    dist.barrier()  # every rank's shards are on disk (the callback waited at train end)
    if dist.get_rank() == 0:
        whole = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        prefix = "net."
        start = {n.removeprefix(prefix): w for n, w in module.full_trajectory[0].items()}
        whole.load_state_dict(start)
        by_hand = bk.PostHocEMA(
            whole,
            sigma_rels=SIGMA_RELS,
            snapshot_every=SNAPSHOT_EVERY,
            snapshot_dir=work_dir / "by_hand",
            snapshot_dtype=torch.float32,
        )
        for weights in module.full_trajectory[1:]:
            whole.load_state_dict({n.removeprefix(prefix): w for n, w in weights.items()})
            by_hand.step()
        by_hand.wait()
        _, headers, _, _, _ = posthoc.plan(snapshot_dir, sigma_rel=0.07)
        result["snapshot_steps"] = [h["step"] for h in headers]
        got = posthoc.reconstruct(snapshot_dir, sigma_rel=0.07)
        expected = posthoc.reconstruct(work_dir / "by_hand", sigma_rel=0.07)
        assert_equal(got, {prefix + n: v for n, v in expected.items()}, "reconstruction")
    dist.barrier()

    # Resumed after the first epoch (step 4, snapshot 1 taken): the numbering goes on.
    resumed_dir = work_dir / "resumed_snapshots"
    resumed_module, resumed = fit_resumed(lambda: make_averaging(resumed_dir), work_dir)
    assert resumed.averager.num_snapshots == averager.num_snapshots
    kinds = [f"profile_{k}" for k in range(len(SIGMA_RELS))]
    assert_resumed_as_straight(resumed_module, resumed, module, averaging, kinds)
    dist.barrier()
    if dist.get_rank() == 0:
        _, headers, _, _, _ = posthoc.plan(resumed_dir, sigma_rel=0.07)
        result["resumed_snapshot_steps"] = [h["step"] for h in headers]
        assert_equal(
            posthoc.reconstruct(resumed_dir, sigma_rel=0.07),
            posthoc.reconstruct(snapshot_dir, sigma_rel=0.07),
            "reconstruction after resume",
        )
    dist.barrier()
    return result


CHECKS = {"ema": check_ema, "posthoc": check_posthoc}


def main(result_path: str, work_dir: str, check: str) -> None:
    cases.report_and_leave(result_path, CHECKS[check](Path(work_dir)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
