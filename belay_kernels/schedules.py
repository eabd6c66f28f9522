"""Decay schedules for the EMA: what ``decay`` is at optimizer step ``t`` (0-based).

Every schedule is a small frozen dataclass with ``decay_at(t)``, and so it is stored in a
checkpoint as plain numbers. Averagers also accept a bare float (a constant decay).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._checks import BelayInputError, check_unit_interval


@dataclass(frozen=True)
class Constant:
    """The same decay at every step."""

    decay: float

    def __post_init__(self):
        _check_decay("decay", self.decay)

    def decay_at(self, t: int) -> float:
        return self.decay


@dataclass(frozen=True)
class Warmup:
    """``1 - (1 + t / gamma) ** -power``, clamped to ``[min_decay, decay]``.

    Early on the shadow follows the model closely; the decay then rises toward ``decay``.
    At ``t = 0`` the raw value is 0, so with ``min_decay = 0`` the first update copies.
    """

    decay: float = 0.9999
    gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0

    def __post_init__(self):
        _check_decay("decay", self.decay)
        _check_decay("min_decay", self.min_decay)
        if not self.gamma > 0 or not self.power > 0:
            raise BelayInputError(
                f"Warmup needs gamma > 0 and power > 0, got gamma={self.gamma!r}, "
                f"power={self.power!r}."
            )
        if self.min_decay > self.decay:
            raise BelayInputError(
                f"Warmup's min_decay ({self.min_decay}) is above its decay ({self.decay})."
            )

    def decay_at(self, t: int) -> float:
        raw = 1.0 - (1.0 + t / self.gamma) ** -self.power
        return min(max(raw, self.min_decay), self.decay)


def half_life(steps: float) -> Constant:
    """The constant decay under which a weight's influence halves every ``steps`` updates."""
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not steps > 0:
        raise BelayInputError(f"half_life must be a positive number of steps, got {steps!r}.")
    return Constant(0.5 ** (1.0 / steps))


def every_k(decay: float, k: int) -> float:
    """The decay to use when updating only every ``k`` steps, so that the time constant in
    optimizer steps does not change: ``1 - (1 - a) ** k`` with ``a = 1 - decay``."""
    return decay**k


def as_schedule(decay: float | Constant | Warmup) -> Constant | Warmup:
    if isinstance(decay, (Constant, Warmup)):
        return decay
    return Constant(decay)


SCHEDULES = {"Constant": Constant, "Warmup": Warmup}


def to_state(schedule: Constant | Warmup) -> dict:
    return {"kind": type(schedule).__name__, **asdict(schedule)}


def from_state(state: dict) -> Constant | Warmup:
    fields = dict(state)
    return SCHEDULES[fields.pop("kind")](**fields)


def _check_decay(name: str, value: object) -> None:
    check_unit_interval(name, value, device=None)
