"""What both trainer integrations share: building the averager, its state as a checkpoint
holds it, and holding a swap open between two hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from torch import nn

from .. import distributed
from .._checks import BelayInputError
from ..averagers import Averager


def averager_factory(averager, averager_kwargs: dict) -> Callable[[nn.Module], Averager]:
    """``averager`` is an averager class (``bk.EMA``) or any callable taking the module
    (``bk.Belay.from_physics``, a lambda); it is called as ``averager(module, **kwargs)``."""
    if not callable(averager):
        raise BelayInputError(
            f"averager must be an averager class such as bk.EMA, or a callable taking the "
            f"module and returning an averager; got {averager!r}."
        )

    def build(module: nn.Module) -> Averager:
        made = averager(module, **averager_kwargs)
        if not isinstance(made, Averager):
            raise BelayInputError(
                f"{averager!r} returned a {type(made).__name__}, not a belay_kernels averager "
                "(EMA, SWA, Belay, TwoPoint, PowerEMA, PostHocEMA)."
            )
        return made

    return build


def whole_state(averager: Averager) -> dict:
    """``averager.state_dict()`` with every DTensor (the average of an FSDP2-sharded model,
    or a sharded DDP shadow) gathered into a whole tensor on the CPU.

    Both trainers write a callback's state from the first rank alone, with ``torch.save``
    (Lightning does so under ``ModelParallelStrategy`` too, beside its distributed
    checkpoint of the model): a DTensor saved that way keeps only that rank's shards, and
    the other ranks' part of the average would be lost. Whole tensors load into any
    layout: ``load_state_dict`` cuts out each rank's piece. The price is the whole average
    on every rank's CPU for the moment of a save. A collective when anything is sharded,
    so every rank must call it."""
    state = averager.state_dict()
    gathered = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            value = {
                name: t.full_tensor().cpu() if distributed.is_dtensor(t) else t
                for name, t in value.items()
            }
        gathered[key] = value
    return gathered


def averager_name(averager) -> str:
    return getattr(averager, "__qualname__", None) or type(averager).__name__


class HeldSwap:
    """``averager.averaged()`` entered in one hook and left in another. Leaving when not
    entered does nothing, so every exit path (end, error) can call ``leave()``."""

    def __init__(self):
        self._stack: contextlib.ExitStack | None = None

    @property
    def active(self) -> bool:
        return self._stack is not None

    def enter(self, averager: Averager) -> None:
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(averager.averaged())
        self._stack = stack

    def leave(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
