"""belay_kernels.integrations.lightning with the real PyTorch Lightning: against its own
EMAWeightAveraging, validation on the average, checkpoints and resume, PostHocEMA's
snapshots and their resume, wait() at the end of training, DDP and ModelParallelStrategy
(FSDP2) on two CPU processes, both package spellings."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from _posthoc_trainer_checks import (  # noqa: E402
    POSTHOC,
    RecordingPostHocEMA,
    assert_same_profiles,
    assert_same_snapshots,
    posthoc_by_hand,
    snapshot_steps,
)
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

import belay_kernels as bk  # noqa: E402
from belay_kernels import posthoc  # noqa: E402
from belay_kernels.integrations.lightning import WeightAveraging  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import lightning_cases as cases  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("accumulate", [1, 4])
def test_average_equals_lightning_ema_one_update_per_optimizer_step(accumulate):
    result = cases.check_matches_lightning_ema(accumulate)
    assert result["steps"] == 16 // accumulate


def test_validation_sees_the_average_and_resume_is_bit_identical(tmp_path):
    result = cases.check_validation_and_resume(str(tmp_path))
    assert result["val_loss_averaged"] != result["val_loss_live"]


def test_a_fresh_trainer_tests_a_checkpoint_on_its_saved_average(tmp_path):
    module, callback = cases.Net(), WeightAveraging(bk.EMA, decay=cases.DECAY)
    train, val = cases.loaders()
    t = cases.trainer(callbacks=[callback], limit_val_batches=0)
    t.fit(module, train)
    t.save_checkpoint(tmp_path / "last.ckpt")
    x, y = val.dataset.tensors
    with torch.no_grad(), callback.averager.averaged():
        expected = nn.functional.mse_loss(module(x), y)

    fresh = cases.Net()  # different weights until the checkpoint loads
    (result,) = cases.trainer(callbacks=[WeightAveraging(bk.EMA, decay=cases.DECAY)]).validate(
        fresh, val, ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():  # and afterwards the module holds the checkpoint's live weights
        assert not torch.allclose(nn.functional.mse_loss(fresh(x), y), expected)
        cases.assert_equal(cases.state(fresh), cases.state(module))


def test_an_error_during_validation_gives_the_live_weights_back():
    class Failing(cases.Net):
        def validation_step(self, batch, batch_idx):
            raise RuntimeError("validation failed")

    module, callback = Failing(), WeightAveraging(bk.EMA, decay=cases.DECAY)
    before = cases.LiveWeights("on_validation_start")
    with pytest.raises(RuntimeError, match="validation failed"):
        cases.trainer(callbacks=[before, callback]).fit(module, *cases.loaders())
    cases.assert_equal(cases.state(module), before.seen[0])
    assert not callback._swap.active


def test_copy_at_end_leaves_the_average_in_the_model():
    module, callback = cases.Net(), WeightAveraging(bk.SWA, copy_at_end=True)
    cases.trainer(callbacks=[callback], limit_val_batches=0).fit(module, cases.loaders()[0])
    averaged = cases.shadow(callback.averager)
    for name, value in module.state_dict().items():
        assert torch.equal(value, averaged[name]), name


def test_factory_and_two_callbacks_keep_separate_states(tmp_path):
    belay = WeightAveraging(bk.Belay.from_physics, k=0.02, m1=1.0, m2=10.0)
    ema = WeightAveraging(bk.EMA, decay=0.9)
    t = cases.trainer(callbacks=[belay, ema], limit_val_batches=0)
    t.fit(cases.Net(), cases.loaders()[0])
    assert belay.state_key != ema.state_key
    t.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]
    assert {saved[belay.state_key]["method"], saved[ema.state_key]["method"]} == {"Belay", "EMA"}


def test_bad_averager_is_refused_before_training():
    with pytest.raises(bk.BelayInputError, match="averager must be an averager class"):
        WeightAveraging("EMA")
    callback = WeightAveraging(lambda module: module)
    with pytest.raises(bk.BelayInputError, match="not a belay_kernels averager"):
        cases.trainer(callbacks=[callback], limit_val_batches=0).fit(
            cases.Net(), cases.loaders()[0]
        )


def test_the_lightning_spelling_works_too():
    L = pytest.importorskip("lightning.pytorch")
    assert isinstance(WeightAveraging(bk.EMA), L.Callback)
    assert isinstance(WeightAveraging(bk.EMA), pl.Callback)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback, module = WeightAveraging(bk.EMA, decay=0.5), Net()
    t = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    t.fit(module, *cases.loaders())
    assert callback.averager.num_steps == t.global_step == 8
    x, y = cases.loaders()[1].dataset.tensors
    with torch.no_grad(), callback.averager.averaged():
        expected = nn.functional.mse_loss(module.net(x), y)
    assert t.callback_metrics["val_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


# ---- PostHocEMA -------------------------------------------------------------------------


class RecordingNet(cases.Net):
    """Keeps the weights at the start and after every optimizer step: the trajectory a
    PostHocEMA driven by hand then follows."""

    def __init__(self):
        super().__init__()
        self.trajectory = [cases.state(self)]

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.trajectory.append(cases.state(self))


def test_posthoc_snapshots_once_per_optimizer_step_as_a_hand_driven_run(tmp_path):
    module = RecordingNet()
    ours = WeightAveraging(bk.PostHocEMA, snapshot_dir=tmp_path / "fit", **POSTHOC)
    t = cases.trainer(
        callbacks=[ours],
        accumulate_grad_batches=2,
        max_epochs=-1,
        max_steps=10,
        limit_val_batches=0,
    )
    t.fit(module, cases.loaders()[0])
    # 20 batches, an optimizer step every second one: 10 steps, snapshots after 3, 6 and 9.
    assert t.global_step == ours.averager.num_steps == len(module.trajectory) - 1 == 10
    assert ours.averager.num_snapshots == 3
    assert snapshot_steps(tmp_path / "fit") == [3, 6, 9]

    by_hand = posthoc_by_hand(cases.Net(), module.trajectory, tmp_path / "by_hand")
    assert_same_snapshots(tmp_path / "fit", tmp_path / "by_hand")
    assert_same_profiles(ours.averager, by_hand)
    cases.assert_equal(
        posthoc.reconstruct(tmp_path / "fit", sigma_rel=0.07),
        posthoc.reconstruct(tmp_path / "by_hand", sigma_rel=0.07),
    )


def test_posthoc_resume_continues_the_snapshots_and_profiles_bit_for_bit(tmp_path):
    """Three epochs of 4 optimizer steps (snapshots after 3, 6, 9, 12) in one run, and as one
    epoch whose checkpoint (after step 4 and snapshot 1) a second fit resumes."""

    def fit(folder, max_epochs, ckpt_path=None, checkpoints=None):
        module = cases.Net()
        callback = WeightAveraging(bk.PostHocEMA, snapshot_dir=folder, **POSTHOC)
        callbacks = [callback]
        if checkpoints is not None:
            callbacks.append(
                ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1)
            )
        cases.trainer(
            callbacks=callbacks,
            accumulate_grad_batches=2,
            max_epochs=max_epochs,
            limit_val_batches=0,
            enable_checkpointing=checkpoints is not None,
        ).fit(module, cases.loaders()[0], ckpt_path=ckpt_path)
        return module, callback.averager

    straight_module, straight = fit(tmp_path / "straight", max_epochs=3)
    assert snapshot_steps(tmp_path / "straight") == [3, 6, 9, 12]

    _, first = fit(tmp_path / "resumed", max_epochs=1, checkpoints=tmp_path / "ckpt")
    assert (first.num_steps, first.num_snapshots) == (4, 1)
    module, resumed = fit(
        tmp_path / "resumed", max_epochs=3, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt"
    )
    assert snapshot_steps(tmp_path / "resumed") == [3, 6, 9, 12]
    assert_same_snapshots(tmp_path / "resumed", tmp_path / "straight")
    assert_same_profiles(resumed, straight)
    cases.assert_equal(cases.state(module), cases.state(straight_module))


def test_wait_runs_before_each_checkpoint_and_when_training_ends(tmp_path):
    events = []
    callback = WeightAveraging(
        RecordingPostHocEMA, events=events, snapshot_dir=tmp_path / "snapshots", **POSTHOC
    )
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    t = cases.trainer(callbacks=[callback, saver], enable_checkpointing=True)
    t.fit(cases.Net(), *cases.loaders())
    saved_at = [step for kind, step in events if kind == "state_dict"]
    assert saved_at == [8, 16]  # one checkpoint per epoch
    for i, event in enumerate(events):
        if event[0] == "state_dict":
            assert events[i - 1] == ("wait", event[1]), events
    assert events[-1] == ("wait", 16), events  # on_train_end, after the last step


class FailingWait(bk.PostHocEMA):
    """A PostHocEMA whose background snapshot write failed: wait() raises that failure."""

    def __init__(self, module, **kwargs):
        super().__init__(module, **kwargs)
        self.failure = OSError("the snapshot write failed: disk full")

    def wait(self):
        raise self.failure


def test_a_failed_snapshot_write_fails_fit_without_hiding_an_earlier_error(tmp_path):
    callback = WeightAveraging(FailingWait, snapshot_dir=tmp_path, **POSTHOC)
    with pytest.raises(OSError, match="disk full"):
        cases.trainer(callbacks=[callback], limit_val_batches=0).fit(
            cases.Net(), cases.loaders()[0]
        )

    class Failing(cases.Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("training failed")
            return super().training_step(batch, batch_idx)

    callback = WeightAveraging(FailingWait, snapshot_dir=tmp_path, **POSTHOC)
    with (
        pytest.raises(RuntimeError, match="training failed"),
        pytest.warns(UserWarning, match="disk full"),
    ):
        cases.trainer(callbacks=[callback], limit_val_batches=0).fit(Failing(), cases.loaders()[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script, tmp_path, *args, timeout=300):
    """``tests/<script> RESULT_JSON *args`` in two processes started together, as torchrun
    would (Lightning sees LOCAL_RANK and launches nothing itself), so their imports
    overlap. Returns what rank 0 wrote to RESULT_JSON; the processes are killed if they
    have not finished within ``timeout`` seconds (a hung collective)."""
    root = Path(__file__).parents[1]
    out = tmp_path / "result.json"
    base = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        NODE_RANK="0",
    )
    command = [sys.executable, str(root / "tests" / script), str(out), *map(str, args)]
    procs = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=dict(base, LOCAL_RANK=str(rank), RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{script} did not finish in {timeout} s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return json.loads(out.read_text())


def test_ddp_on_two_cpu_processes(tmp_path):
    """The same checks under strategy="ddp", devices=2 (gloo), and validation and resume
    again with shard_shadow=True (each rank keeps a slice of the shadow)."""
    result = run_two_ranks("lightning_ddp_script.py", tmp_path, tmp_path / "ckpt")
    assert result["world_size"] == 2
    assert result["matches_lightning"]["steps"] == 8  # 4 batches per rank per epoch
    assert result["matches_lightning_accumulate_4"]["steps"] == 2
    for check in ("validation_and_resume", "sharded_shadow_validation_and_resume"):
        assert result[check]["val_loss_averaged"] != result[check]["val_loss_live"]


def test_ema_under_model_parallel_strategy_fsdp2_on_two_cpu_processes(tmp_path):
    """ModelParallelStrategy, fully_shard in configure_model, gloo: each rank's shadow of its
    shards and the gathered shadow against EMAs computed in the script, validation on the
    average, and a resume from a checkpoint bit for bit."""
    result = run_two_ranks("lightning_model_parallel_script.py", tmp_path, tmp_path, "ema")
    assert result["world_size"] == 2
    assert result["steps"] == 8
    assert result["val_loss_averaged"] != result["val_loss_live"]


def test_posthoc_under_model_parallel_strategy_fsdp2_on_two_cpu_processes(tmp_path):
    """As above with PostHocEMA: each rank's profiles against power-function EMAs of its
    shards, the snapshots against a hand-driven unsharded run, and a resume that goes on
    numbering the snapshots."""
    result = run_two_ranks("lightning_model_parallel_script.py", tmp_path, tmp_path, "posthoc")
    assert result["world_size"] == 2
    assert result["steps"] == 8
    assert result["snapshot_steps"] == result["resumed_snapshot_steps"] == [3, 6]
    assert result["val_loss_averaged"] != result["val_loss_live"]
