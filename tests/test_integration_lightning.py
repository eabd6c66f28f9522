"""belay_kernels.integrations.lightning with the real PyTorch Lightning: against its own
EMAWeightAveraging, validation on the average, checkpoints and resume, DDP on two CPU
processes, both package spellings."""

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

import belay_kernels as bk  # noqa: E402
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes(tmp_path):
    """The same checks under strategy="ddp", devices=2 (gloo), in two processes started
    together, as torchrun would (Lightning sees LOCAL_RANK and launches nothing itself), so
    their imports overlap."""
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
    script = [
        sys.executable,
        str(root / "tests" / "lightning_ddp_script.py"),
        str(out),
        str(tmp_path / "ckpt"),
    ]
    procs = [
        subprocess.Popen(
            script,
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
            logs.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the DDP run did not finish in 300 s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["matches_lightning"]["steps"] == 8  # 4 batches per rank per epoch
    assert result["matches_lightning_accumulate_4"]["steps"] == 2
    assert (
        result["validation_and_resume"]["val_loss_averaged"]
        != result["validation_and_resume"]["val_loss_live"]
    )
