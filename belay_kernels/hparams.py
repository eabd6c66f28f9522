"""The averagers' hyperparameters: one frozen dataclass per method, checked once when it is
made, so the constructor and ``load_state_dict`` run the same checks. PowerEMA's and
PostHocEMA's live beside them in :mod:`belay_kernels.posthoc`.

``to_state()`` gives the plain dict that ``state_dict()["hparams"]`` holds and
``from_state()`` reads it back (refusing a malformed one with :class:`BelayInputError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from ._checks import BelayInputError, check_unit_interval
from .schedules import Constant, Warmup, as_schedule, from_state, to_state
from .schedules import half_life as half_life_decay


def check_every(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BelayInputError(f"{name} must be an int >= 1, got {value!r}.")
    return value


def set_converted(hparams, name: str, value: object) -> None:
    """Store a checked value in its converted form (a frozen dataclass refuses setattr)."""
    object.__setattr__(hparams, name, value)


@dataclass(frozen=True)
class Hparams:
    """What every method's hyperparameters share: the checkpoint form and its reading."""

    def to_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def _decode(cls, state: dict) -> dict:
        """The constructor's keyword arguments from the checkpoint form."""
        return dict(state)

    @classmethod
    def from_state(cls, state: dict) -> Hparams:
        try:
            if not isinstance(state, Mapping):
                raise TypeError(f"expected a dict, got {type(state).__name__}")
            return cls(**cls._decode(state))
        except BelayInputError as exc:
            raise BelayInputError(f"the saved hyperparameters are bad: {exc}") from None
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise BelayInputError(
                f"the saved hyperparameters {state!r} are malformed: {exc}"
            ) from None


def decay_schedule(decay=None, half_life=None) -> Constant | Warmup:
    """The EMA's schedule from its constructor's ``decay`` or ``half_life`` (default 0.999)."""
    if decay is not None and half_life is not None:
        raise BelayInputError("give decay or half_life, not both.")
    if half_life is not None:
        return half_life_decay(half_life)
    return as_schedule(0.999 if decay is None else decay)


@dataclass(frozen=True)
class EMAHparams(Hparams):
    schedule: Constant | Warmup = Constant(0.999)
    every: int = 1

    def __post_init__(self):
        if not isinstance(self.schedule, (Constant, Warmup)):
            raise BelayInputError(
                f"schedule must be a Constant or Warmup schedule, got {self.schedule!r}."
            )
        check_every("every", self.every)

    def to_state(self) -> dict:
        return {"schedule": to_state(self.schedule), "every": self.every}

    @classmethod
    def _decode(cls, state: dict) -> dict:
        fields_ = dict(state)
        if "schedule" in fields_:
            fields_["schedule"] = from_state(fields_["schedule"])
        return fields_


@dataclass(frozen=True)
class SWAHparams(Hparams):
    start: int = 0
    every: int = 1

    def __post_init__(self):
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise BelayInputError(f"start must be an int >= 0, got {self.start!r}.")
        check_every("every", self.every)


# BELAY's two forms: the shadow follows the weights from after the optimizer's step (any
# optimizer, Belay.step()), or from before it, as the poster writes it (a fused step only).
BELAY_FORMS = ("post-step", "poster")


@dataclass(frozen=True)
class BelayHparams(Hparams):
    alpha: float
    beta: float
    # the optimizer step scale that from_physics() implies; informational
    eta: float | None = None
    form: str = "post-step"  # one of BELAY_FORMS

    def __post_init__(self):
        if self.form not in BELAY_FORMS:
            raise BelayInputError(f"form must be one of {BELAY_FORMS}, got {self.form!r}.")
        check_unit_interval("alpha", self.alpha, None)
        check_unit_interval("beta", self.beta, None)
        eta = self.eta
        if eta is not None and not (isinstance(eta, (int, float)) and eta > 0):
            raise BelayInputError(f"eta must be a positive number or None, got {eta!r}.")
        set_converted(self, "alpha", float(self.alpha))
        set_converted(self, "beta", float(self.beta))


@dataclass(frozen=True)
class TwoPointHparams(Hparams):
    gap: int

    def __post_init__(self):
        check_every("gap", self.gap)


class HparamAttribute:
    """An averager attribute that reads its frozen hyperparameters, and on assignment
    replaces them with a checked copy (``ema.every = 2`` is checked like the constructor's)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, averager, owner=None):
        if averager is None:
            return self
        return getattr(averager._hparams, self.name)

    def __set__(self, averager, value) -> None:
        averager._hparams = replace(averager._hparams, **{self.name: value})
