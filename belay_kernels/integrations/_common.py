"""What both trainer integrations share: building the averager, and holding a swap open
between two hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

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
                "(EMA, SWA, Belay, TwoPoint)."
            )
        return made

    return build


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
