"""belay_kernels.integrations.transformers with the real transformers.Trainer, on a tiny
GPT-2 built from a config (random weights, no downloads) and token data made here:
evaluation on the average, checkpoints and resume, PostHocEMA's snapshots and their
resume, wait() before each checkpoint and at the end of training."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _posthoc_trainer_checks import (  # noqa: E402
    POSTHOC,
    RecordingPostHocEMA,
    assert_same_profiles,
    assert_same_snapshots,
    posthoc_by_hand,
    snapshot_steps,
)

import belay_kernels as bk  # noqa: E402
from belay_kernels import posthoc  # noqa: E402
from belay_kernels.integrations.transformers import STATE_FILE, AveragingCallback  # noqa: E402

DECAY = 0.8
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        # Arithmetic sequences mod 64: learnable within a few steps, so the live and the
        # averaged weights evaluate clearly apart.
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(16)) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        # The first label is ignored: the model cannot predict it (its loss is over the
        # shifted labels), and the Trainer divides by the number of labels not ignored.
        labels = self.ids[i].clone()
        labels[0] = -100
        return {"input_ids": self.ids[i], "labels": labels}


EVAL = Tokens(8, seed=2)


def make_trainer(tmp_path, callbacks, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    model = tiny_gpt2()
    return model, transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(64, seed=1),
        eval_dataset=EVAL,
        callbacks=callbacks,
    )


def eval_loss(model):
    batch = {
        k: torch.stack([EVAL[i][k] for i in range(len(EVAL))]) for k in ("input_ids", "labels")
    }
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


def live(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Reference(transformers.TrainerCallback):
    """Placed before AveragingCallback: keeps its own torch.lerp EMA of the weights seen at
    each on_step_end (once per optimizer step), and evaluates copies of the model on those
    and on the live weights, to compare with what the Trainer logs."""

    def __init__(self):
        self.ema = None
        self.evals = {}  # step -> (loss on the reference average, loss on the live weights)
        self.live_at_eval = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        if self.ema is None:
            self.ema = {n: w.clone() for n, w in self.start.items()}
        for n, w in weights.items():
            self.ema[n].lerp_(w, 1 - DECAY)
        if control.should_evaluate:
            twin = copy.deepcopy(model)
            self.live_at_eval[state.global_step] = live(twin)
            live_loss = eval_loss(twin)
            with torch.no_grad():
                for n, p in twin.named_parameters():
                    p.copy_(self.ema[n])
            self.evals[state.global_step] = (eval_loss(twin), live_loss)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}


class SavedWeights(transformers.TrainerCallback):
    def __init__(self):
        self.at_save = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at_save[state.global_step] = live(model)


def test_steps_per_optimizer_step_evaluates_on_the_average_and_resumes_bit_exactly(tmp_path):
    reference, saved, ours = Reference(), SavedWeights(), AveragingCallback(bk.EMA, decay=DECAY)
    model, trainer = make_trainer(tmp_path, [reference, ours, saved])
    trainer.train()

    # One update per optimizer step: 64 samples / (4 per batch x 2 accumulated) = 8 steps.
    assert trainer.state.global_step == ours.averager.num_steps == 8
    for name, value in zip(ours.averager.names(), ours.averager.shadow_params()):
        torch.testing.assert_close(value, reference.ema[name], rtol=0, atol=0, msg=name)

    # Evaluations at steps 4 and 8 ran on the average; the live weights came back.
    logged = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(logged) == sorted(reference.evals) == [4, 8]
    for step, (averaged_loss, live_loss) in reference.evals.items():
        assert logged[step] == pytest.approx(averaged_loss, rel=1e-6)
        assert logged[step] != pytest.approx(live_loss, rel=1e-3)
        for k, v in saved.at_save[step].items():
            assert torch.equal(v, reference.live_at_eval[step][k]), k
    assert (tmp_path / "out" / "checkpoint-4" / STATE_FILE).is_file()

    # Resume from the checkpoint at step 4 in a new Trainer: bit-identical at step 8.
    straight = live(model), [s.clone() for s in ours.averager.shadow_params()]
    resumed = AveragingCallback(bk.EMA, decay=DECAY)
    model2, trainer2 = make_trainer(tmp_path, [resumed])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.averager.num_steps == 8
    for k, v in live(model2).items():
        assert torch.equal(v, straight[0][k]), k
    for a, b in zip(resumed.averager.shadow_params(), straight[1]):
        assert torch.equal(a, b)


def test_evaluate_after_training_and_save_pretrained_the_average(tmp_path):
    ours = AveragingCallback(bk.EMA, decay=DECAY, save_pretrained_to=tmp_path / "averaged")
    model, trainer = make_trainer(
        tmp_path, [ours], eval_strategy="no", save_strategy="no", max_steps=4
    )
    trainer.train()
    live_before = live(model)
    with ours.averaged():
        averaged_metrics = trainer.evaluate()
        expected = eval_loss(model)
    assert averaged_metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    for k, v in live(model).items():
        assert torch.equal(v, live_before[k]), k
    assert trainer.evaluate()["eval_loss"] == pytest.approx(eval_loss(model), rel=1e-6)
    assert trainer.evaluate()["eval_loss"] != pytest.approx(expected, rel=1e-3)

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "averaged")
    averages = dict(zip(ours.averager.names(), ours.averager.shadow_params()))
    for name, value in reloaded.named_parameters():
        assert torch.equal(value, averages[name]), name


def test_resuming_without_a_saved_average_says_where_it_looked(tmp_path):
    model, trainer = make_trainer(tmp_path, [], eval_strategy="no", max_steps=4)
    trainer.train()  # a checkpoint at step 4, without the callback
    model, trainer = make_trainer(tmp_path, [AveragingCallback(bk.EMA)], eval_strategy="no")
    with pytest.raises(bk.BelayInputError, match="no averager state was found"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


# ---- PostHocEMA -------------------------------------------------------------------------


class Trajectory(transformers.TrainerCallback):
    """The weights when training begins and after every optimizer step (on_optimizer_step,
    not the callback's own hook): the trajectory a PostHocEMA driven by hand follows."""

    def __init__(self):
        self.weights = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(live(model))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.weights.append(live(model))


def test_posthoc_snapshots_once_per_optimizer_step_as_a_hand_driven_run(tmp_path):
    trajectory = Trajectory()
    ours = AveragingCallback(bk.PostHocEMA, snapshot_dir=tmp_path / "train", **POSTHOC)
    model, trainer = make_trainer(
        tmp_path, [trajectory, ours], eval_strategy="no", save_strategy="no"
    )
    trainer.train()
    # 16 batches, 2 accumulated per optimizer step: 8 steps, snapshots after 3 and 6.
    assert trainer.state.global_step == ours.averager.num_steps == 8
    assert len(trajectory.weights) == 9
    assert ours.averager.num_snapshots == 2
    assert snapshot_steps(tmp_path / "train") == [3, 6]

    by_hand = posthoc_by_hand(tiny_gpt2(), trajectory.weights, tmp_path / "by_hand")
    assert_same_snapshots(tmp_path / "train", tmp_path / "by_hand")
    assert_same_profiles(ours.averager, by_hand)
    reconstructed = posthoc.reconstruct(tmp_path / "train", sigma_rel=0.07)
    expected = posthoc.reconstruct(tmp_path / "by_hand", sigma_rel=0.07)
    assert reconstructed.keys() == expected.keys()
    for name, value in reconstructed.items():
        assert torch.equal(value, expected[name]), name


def test_posthoc_resume_continues_the_snapshots_and_profiles_bit_for_bit(tmp_path):
    """8 optimizer steps (snapshots after 3 and 6) in one run, and as a run of 4 steps
    (snapshot 1, a checkpoint at step 4) that a second Trainer resumes to step 8."""
    straight = AveragingCallback(bk.PostHocEMA, snapshot_dir=tmp_path / "straight", **POSTHOC)
    straight_model, trainer = make_trainer(
        tmp_path / "a", [straight], eval_strategy="no", save_strategy="no"
    )
    trainer.train()
    assert snapshot_steps(tmp_path / "straight") == [3, 6]

    first = AveragingCallback(bk.PostHocEMA, snapshot_dir=tmp_path / "resumed", **POSTHOC)
    _, trainer = make_trainer(tmp_path / "b", [first], eval_strategy="no", max_steps=4)
    trainer.train()
    assert (first.averager.num_steps, first.averager.num_snapshots) == (4, 1)
    resumed = AveragingCallback(bk.PostHocEMA, snapshot_dir=tmp_path / "resumed", **POSTHOC)
    model, trainer = make_trainer(tmp_path / "b", [resumed], eval_strategy="no", save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))
    assert snapshot_steps(tmp_path / "resumed") == [3, 6]
    assert_same_snapshots(tmp_path / "resumed", tmp_path / "straight")
    assert_same_profiles(resumed.averager, straight.averager)
    for k, v in live(model).items():
        assert torch.equal(v, live(straight_model)[k]), k


def test_wait_runs_before_each_checkpoint_and_when_training_ends(tmp_path):
    events = []
    ours = AveragingCallback(
        RecordingPostHocEMA, events=events, snapshot_dir=tmp_path / "snapshots", **POSTHOC
    )
    _, trainer = make_trainer(tmp_path, [ours], eval_strategy="no")
    trainer.train()
    saved_at = [step for kind, step in events if kind == "state_dict"]
    assert saved_at == [4, 8]  # save_steps=4
    for i, event in enumerate(events):
        if event[0] == "state_dict":
            assert events[i - 1] == ("wait", event[1]), events
    assert events[-1] == ("wait", 8), events  # on_train_end, after the last step


class FailingWait(bk.PostHocEMA):
    """A PostHocEMA whose background snapshot write failed: wait() raises that failure."""

    def wait(self):
        raise OSError("the snapshot write failed: disk full")


def test_a_failed_snapshot_write_fails_train(tmp_path):
    ours = AveragingCallback(FailingWait, snapshot_dir=tmp_path / "snapshots", **POSTHOC)
    _, trainer = make_trainer(tmp_path, [ours], eval_strategy="no", save_strategy="no", max_steps=4)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
