"""A ``transformers.Trainer`` callback that keeps a belay_kernels averager next to the model.

    import belay_kernels as bk
    from belay_kernels.integrations.transformers import AveragingCallback

    averaging = AveragingCallback(bk.EMA, decay=0.999)
    trainer = Trainer(model, args, train_dataset=..., eval_dataset=..., callbacks=[averaging])
    trainer.train()                      # evaluations during training see the average
    with averaging.averaged():           # and so does one after it
        trainer.evaluate()

When each thing happens, and why:

- The averager is built at ``on_train_begin``: after the Trainer has loaded a checkpoint,
  moved the model and wrapped it, so it sees the tensors that train.
- It steps at ``on_step_end``, which the Trainer calls once per optimizer step (micro-batches
  under ``gradient_accumulation_steps`` get ``on_substep_end`` instead).
- The Trainer has no hook before an evaluation, so the average is swapped in at the hook
  that decides one (``on_step_end`` / ``on_epoch_end`` when ``control.should_evaluate`` is
  set, ``on_train_begin`` for ``eval_on_start``) and swapped back at ``on_evaluate``, which
  comes before any checkpoint is written: checkpoints hold the live weights.
- ``on_save`` writes the averager's ``state_dict()`` into the checkpoint folder
  (``belay_averager.pt``); a run resumed with ``resume_from_checkpoint`` loads it.
- ``averager.wait()`` runs before that state is saved and at ``on_train_end``: a
  ``PostHocEMA`` may still be writing a snapshot in the background, and neither a
  checkpoint that counts the snapshot nor the end of ``train()`` may come before the file
  is on disk. A failed write is raised there.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._checks import BelayInputError
from ..averagers import Averager
from ._common import HeldSwap, averager_factory, whole_state

STATE_FILE = "belay_averager.pt"


class AveragingCallback(TrainerCallback):
    """Keep ``averager(model, **averager_kwargs)`` while ``Trainer.train()`` runs.

    ``averager`` is an averager class (``bk.EMA``, ``bk.SWA``, ``bk.Belay``,
    ``bk.TwoPoint``, ``bk.PowerEMA``, ``bk.PostHocEMA``) or a callable taking the model
    (``bk.Belay.from_physics``).
    At the end of training, ``save_pretrained_to=folder`` writes the averaged model with
    ``save_pretrained``, and ``copy_at_end=True`` copies the average into the model
    (by default the model keeps its live weights). The averager is ``self.averager``.
    """

    def __init__(
        self,
        averager,
        *,
        copy_at_end: bool = False,
        save_pretrained_to: str | os.PathLike | None = None,
        **averager_kwargs: Any,
    ):
        self._build = averager_factory(averager, averager_kwargs)
        self.copy_at_end = bool(copy_at_end)
        self.save_pretrained_to = save_pretrained_to
        self.averager: Averager | None = None
        self._swap = HeldSwap()

    @contextlib.contextmanager
    def averaged(self):
        """The average swapped into the model, for an evaluation outside ``train()``."""
        if self.averager is None:
            raise BelayInputError(
                "there is no average yet: run trainer.train() with this callback first."
            )
        with self.averager.averaged() as model:
            yield model

    # ---- training ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._swap.leave()
        self.averager = self._build(model)
        if state.global_step > 0:  # resumed: the Trainer loaded the checkpoint's state
            path = _resumed_state_file(args, state)
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("num_steps") != state.global_step:
                raise BelayInputError(
                    f"{path} holds the averager after {saved.get('num_steps')} steps, but training "
                    f"resumed at step {state.global_step}: it is from another checkpoint."
                )
            self.averager.load_state_dict(saved)
        if args.eval_on_start:
            self._swap.enter(self.averager)

    def on_step_end(self, args, state, control, **kwargs):
        self.averager.step()
        self._enter_if_evaluating(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._enter_if_evaluating(control)

    def _enter_if_evaluating(self, control) -> None:
        if control.should_evaluate:
            self._swap.enter(self.averager)

    def on_evaluate(self, args, state, control, **kwargs):
        self._swap.leave()

    def on_save(self, args, state, control, **kwargs):
        # Every rank: each one's averager may have a snapshot write in flight, and gathering
        # a sharded average is a collective. Then one rank writes the whole average.
        self.averager.wait()
        saved = whole_state(self.averager)
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise BelayInputError(
                f"AveragingCallback expected the checkpoint the Trainer just saved at {folder}, "
                "and it is not there (a hyperparameter-search run directory?). The averager "
                "state could not be saved with it."
            )
        torch.save(saved, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._swap.leave()
        self.averager.wait()
        if self.save_pretrained_to is not None and state.is_world_process_zero:
            with self.averager.averaged():
                model.save_pretrained(self.save_pretrained_to)
        if self.copy_at_end:
            self.averager.copy_to(model)


def _resumed_state_file(args, state) -> str:
    """The averager state of the checkpoint this run resumed from. The callback is not told
    which folder that was; it is ``args.resume_from_checkpoint`` when that names a folder,
    else the Trainer's own ``output_dir/checkpoint-<step>``."""
    candidates = []
    if isinstance(args.resume_from_checkpoint, (str, os.PathLike)):
        candidates.append(os.path.join(args.resume_from_checkpoint, STATE_FILE))
    candidates.append(
        os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)
    )
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise BelayInputError(
        f"training resumed at step {state.global_step}, but no averager state was found "
        f"(looked at {', '.join(candidates)}). Resume from a checkpoint saved with "
        "AveragingCallback; if it lies outside output_dir, also set "
        "TrainingArguments(resume_from_checkpoint=<that folder>)."
    )
