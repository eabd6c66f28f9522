"""A Lightning callback that keeps a belay_kernels averager next to the model.

    import belay_kernels as bk
    from belay_kernels.integrations.lightning import WeightAveraging

    trainer = Trainer(callbacks=[WeightAveraging(bk.EMA, decay=0.999)])
    trainer.fit(module, train_loader, val_loader)   # validation sees the average

It works with ``pytorch_lightning`` and ``lightning.pytorch``: the callback derives from
the ``Callback`` of every spelling that is installed, so either ``Trainer`` accepts it.

When each thing happens, and why:

- The averager is built at ``on_fit_start``: after ``setup``, ``configure_model`` and the
  strategy's wrapping and device placement, so it sees the tensors the model trains.
- It steps in ``on_train_batch_end`` when ``trainer.global_step`` has moved since the last
  step: once per optimizer step under ``accumulate_grad_batches``, and not at all for a
  batch whose optimizer step did not happen.
- Validation, test and predict run inside ``averaged()`` (from ``on_*_start`` to
  ``on_*_end``, so the module's own epoch-end hooks see the average too); the live
  weights come back bit for bit, also when the loop raises.
- The averager's ``state_dict()`` is the callback's state in the checkpoint; resuming with
  ``ckpt_path`` loads it into the new averager. A ``trainer.test(ckpt_path=...)`` with a
  fresh callback builds the averager from the module and evaluates the saved average.
  The average of a sharded model (``ModelParallelStrategy`` with ``fully_shard``, or
  ``shard_shadow=True`` under DDP) is saved as whole tensors, gathered from every rank
  when the checkpoint is written: Lightning writes the callbacks' states from rank 0 alone.
- ``averager.wait()`` runs when training ends (``on_train_end``) and before the averager's
  state goes into a checkpoint: a ``PostHocEMA`` may still be writing a snapshot in the
  background, and a checkpoint that counts that snapshot, or a run that reports success,
  must not come before the file is on disk. A failed write fails ``fit``. After an error in
  ``fit`` it runs too (so no write is cut off), and a failure of its own is then a warning:
  the error the run stopped on is the one ``fit`` raises.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any

from .._checks import BelayInputError
from ..averagers import Averager
from ._common import HeldSwap, averager_factory, averager_name, whole_state

SPELLINGS = ("lightning.pytorch", "pytorch_lightning")


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in SPELLINGS:
        top = name.split(".")[0]
        if importlib.util.find_spec(top) is None:
            continue
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:  # `lightning` without its pytorch part, say
            continue
    if not bases:
        raise ImportError(
            "belay_kernels.integrations.lightning needs PyTorch Lightning 2.x: "
            "pip install 'belay_kernels[lightning]' (or pytorch-lightning, or lightning)."
        )
    return tuple(bases)


class WeightAveraging(*_callback_bases()):
    """Keep ``averager(module, **averager_kwargs)`` during ``fit``; evaluate on its average.

    ``averager`` is an averager class (``bk.EMA``, ``bk.SWA``, ``bk.Belay``,
    ``bk.TwoPoint``, ``bk.PowerEMA``, ``bk.PostHocEMA``) or a callable taking the module
    (``bk.Belay.from_physics``).
    ``copy_at_end=True`` writes the average into the model when ``fit`` ends, as
    Lightning's own ``WeightAveraging`` does; by default the model keeps its live weights
    and only evaluation sees the average. The averager is ``self.averager`` (``None``
    before the first ``fit``).
    """

    def __init__(self, averager, *, copy_at_end: bool = False, **averager_kwargs: Any):
        self._build = averager_factory(averager, averager_kwargs)
        self._name = averager_name(averager)
        self.copy_at_end = bool(copy_at_end)
        self.averager: Averager | None = None
        self._pending_state: dict | None = None
        self._last_global_step: int | None = None
        self._in_fit = False
        self._swap = HeldSwap()

    @property
    def state_key(self) -> str:
        # Two of these callbacks with different averagers keep separate states.
        return self._generate_state_key(averager=self._name)

    # ---- building and stepping ---------------------------------------------------------
    def _make_averager(self, pl_module) -> None:
        self._swap.leave()
        self.averager = self._build(pl_module)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.averager.load_state_dict(state)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._make_averager(pl_module)
        self._in_fit = True

    def on_train_start(self, trainer, pl_module) -> None:
        # After the checkpoint's loops are restored, so a resumed global_step counts.
        self._last_global_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._last_global_step:
            self.averager.step()
            self._last_global_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if self.averager is not None:
            self.averager.wait()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._swap.leave()
        self._in_fit = False
        if self.copy_at_end and self.averager is not None:
            self.averager.copy_to(pl_module)

    # ---- evaluating on the average -----------------------------------------------------
    def _enter(self, pl_module, stage: str) -> None:
        if self._pending_state is not None:
            self._make_averager(pl_module)  # evaluating a checkpoint outside fit
        if self.averager is None:
            warnings.warn(
                f"WeightAveraging: {stage} runs on the live weights: there is no average yet "
                "(no fit with this callback, and no checkpoint with its state was loaded).",
                stacklevel=2,
            )
            return
        self._swap.enter(self.averager)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._enter(pl_module, "validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap.leave()

    def on_test_start(self, trainer, pl_module) -> None:
        self._enter(pl_module, "test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap.leave()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._enter(pl_module, "predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._swap.leave()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap.leave()
        self._in_fit = False
        if self.averager is None:
            return
        try:
            self.averager.wait()
        except Exception as failure:
            # Raising here would replace the error Lightning is about to re-raise; the
            # snapshot failure is reported beside it instead (unless it is that error,
            # raised by the wait() in on_train_end).
            if failure is not exception:
                warnings.warn(
                    f"WeightAveraging: the run stopped on {type(exception).__name__}, and the "
                    f"averager's background work failed too: {type(failure).__name__}: {failure}",
                    stacklevel=2,
                )

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._pending_state is not None or self.averager is None:  # loaded, not yet built
            return dict(self._pending_state or {})
        # The state counts the snapshots taken; the last one must be written before a
        # checkpoint says it exists.
        self.averager.wait()
        # Lightning asks every rank for it, then rank 0 writes it: a sharded average is
        # gathered whole (see whole_state) so that no rank's part is lost.
        return whole_state(self.averager)

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "method" not in state_dict:
            raise BelayInputError(
                f"the checkpoint's state for {self.state_key} is not an averager state "
                f"(keys: {sorted(state_dict)[:5] if isinstance(state_dict, dict) else state_dict!r})."
            )
        if self._in_fit:  # strategies that restore after setup (FSDP, ModelParallel)
            self.averager.load_state_dict(state_dict)
        else:  # on_fit_start (or the next evaluation) builds the averager and loads it
            self._pending_state = state_dict
