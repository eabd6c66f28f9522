"""An optimizer and an averager in one pass over memory: :func:`fuse`.

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ema = belay_kernels.EMA(model, decay=0.999)
    optimizer = belay_kernels.fuse(optimizer, ema)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
    for batch in loader:
        loss(model, batch).backward()
        optimizer.step()          # AdamW and the EMA: each tensor read and written once
        optimizer.zero_grad()
        scheduler.step()
    with ema.averaged():
        evaluate(model)

Unfused, a step reads and writes the parameters twice: in the optimizer, then in the
averager. Fused, the averager's update runs on the new weights while they are still in
registers. The results are those of ``torch.optim.AdamW(foreach=False)`` (or ``Adam``,
``SGD``) followed by the averager's ``step()``: the kernels round op for op as torch's
single-tensor optimizers do (:func:`belay_kernels.reference.adam_average_` is the spec).

The fused optimizer is a :class:`torch.optim.Optimizer` over the wrapped optimizer's own
``param_groups`` and ``state``: LR schedulers, ``zero_grad`` and ``torch.amp.GradScaler``
work as with the original, and ``state_dict()`` is the original's, in torch's format (a
checkpoint loads into a plain ``torch.optim.AdamW`` and back). The averager keeps its own
state; after fusing, its ``step()`` refuses, since the optimizer's step updates it.

``Belay(form="poster")`` exists only fused: its shadow follows the weights from before
the optimizer's step, as the poster's equations write it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import _backends, distributed, reference
from ._checks import BelayInputError
from .averagers import Averager, Track

# The optimizers whose step the kernels reproduce, by exact type: a subclass may change
# step() in ways the kernels would not follow.
_KINDS = {torch.optim.Adam: "adam", torch.optim.AdamW: "adam", torch.optim.SGD: "sgd"}
_OPS = {"adam": "adam_average_", "sgd": "sgd_average_"}

# The options of torch's Adam, AdamW and SGD that the kernels do not cover (every other
# one they do; ``foreach`` and ``fused`` pick torch's own implementation, which the fused
# step replaces).
_REQUIRED_FALSE = ("differentiable", "capturable")

# id(parameter) -> its fused optimizer (a weak reference), for every parameter fused so
# far: a parameter in two fused pairs would be stepped, or averaged, twice. While that
# optimizer lives it holds the parameter, so the id names no other tensor.
_FUSED_PARAMS: dict[int, weakref.ref] = {}


@dataclass
class _Bucket:
    """The parameters of one param group that one kernel call takes: one device, one
    parameter dtype, one shadow dtype. ``shadows`` holds the averager's profiles of them,
    profile after profile; ``params`` the tensors the kernels write (a DTensor's local
    shard)."""

    module: object  # the backend
    parameters: list[torch.Tensor]  # the optimizer's parameters (DTensors stay DTensors)
    params: list[torch.Tensor]
    shadows: list[torch.Tensor]
    skipped: torch.Tensor
    dtensor: bool
    # The optimizer's state tensors of these parameters as the kernels take them, once
    # they all exist (see _adam_state); dropped when the plan is redone.
    state: tuple | None = None


def fuse(optimizer: torch.optim.Optimizer, averager: Averager) -> FusedOptimizer:
    """``optimizer`` and ``averager`` stepped together, one pass over memory per tensor
    list: a :class:`FusedOptimizer` to use in place of ``optimizer``.

    ``optimizer`` is a ``torch.optim.AdamW``, ``Adam`` or ``SGD`` over exactly the
    parameters ``averager`` averages (its floating buffers, which no optimizer steps, keep
    their own update). Anything else is refused here, with nothing changed."""
    return FusedOptimizer(optimizer, averager)


class FusedOptimizer(torch.optim.Optimizer):
    """See :func:`fuse`. The wrapped optimizer's ``param_groups``, ``state`` and
    ``defaults`` are this one's; only ``step()`` differs."""

    # GradScaler hands this optimizer its scale and found_inf instead of unscaling and
    # reading found_inf on the host: the kernels unscale, or skip the step, themselves.
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, averager: Averager):
        kind = _check_pair(optimizer, averager)
        # No Optimizer.__init__: it would build new param groups; these are the wrapped
        # optimizer's own, shared, so a scheduler or a checkpoint sees one set of them.
        self._optimizer = optimizer
        self._averager = averager
        self._kind = kind
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        # The wrapped optimizer's hooks are this one's: a hook registered on either runs
        # when the fused step does (torch's step wrapper, patched in below, runs them).
        for hooks in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, hooks, getattr(optimizer, hooks))
        self._patch_step_function()
        averager._fused_ids = frozenset(id(p) for p in averager._parameters)
        averager._fused_by = self
        try:
            averager._plan()  # its own launches now leave the fused parameters out
            self._plan()
        except BaseException:
            averager._fused_ids, averager._fused_by = frozenset(), None
            averager._plan()
            raise
        for p in averager._parameters:
            _FUSED_PARAMS[id(p)] = weakref.ref(self)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer (its step() is not fused: step this one)."""
        return self._optimizer

    @property
    def averager(self) -> Averager:
        return self._averager

    def __repr__(self) -> str:
        return f"fuse({self._optimizer!r}, {self._averager!r})"

    # ---- the plan ----------------------------------------------------------------------
    def _plan(self) -> None:
        """Per param group, the buckets of one kernel call each, with the averager's
        shadows of their parameters; redone whenever the averager plans again (its tracks'
        tensors may have moved: FSDP2's new local shards)."""
        averager = self._averager
        where = _shadow_places(averager)
        op = _OPS[self._kind]
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple, list] = {}
            for p in group["params"]:
                track, i = where[id(p)]
                local = track.views(track.weights)[i]
                profiles = [track.views(b)[i] for b in [track.shadow, *track.extra_profiles]]
                key = (local.device, local.dtype, profiles[0].dtype, local.is_contiguous())
                by_key.setdefault(key, []).append((p, local.detach(), profiles, track.dtensor))
            group_buckets = []
            for (device, dtype, shadow_dtype, contiguous), members in by_key.items():
                module = _backends.resolve(
                    averager.backend, op, device.type, (dtype, shadow_dtype), contiguous
                )
                k = len(members[0][2])
                group_buckets.append(
                    _Bucket(
                        module=module,
                        parameters=[m[0] for m in members],
                        params=[m[1] for m in members],
                        shadows=[m[2][j] for j in range(k) for m in members],
                        skipped=averager._skipped[device],
                        dtensor=any(m[3] for m in members),
                    )
                )
            buckets.append(group_buckets)
        self._buckets = buckets
        self._planned_for = averager._bound

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """The optimizer's step and the averager's update, one kernel call per bucket;
        then the averager's own launches for what no optimizer steps (floating buffers)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        averager = self._averager
        averager._ensure_bound("the fused optimizer's step()")
        if averager._bound is not self._planned_for:
            self._plan()
        groups = [self._group_options(group) for group in self.param_groups]
        average, scalars = averager._average_at(averager._steps)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip = averager._skip
        for options, buckets in zip(groups, self._buckets):
            for bucket in buckets:
                self._run(bucket, options, average, list(scalars), grad_scale, found_inf, skip)
        averager._advance()  # the rest (buffers), the counters, and what follows a step
        return loss

    def _group_options(self, group: dict) -> dict:
        """A param group's numbers for the kernels, checked on every step: a scheduler or
        the user may change them between steps."""
        for key in _REQUIRED_FALSE:
            if group.get(key, False):
                raise BelayInputError(
                    f"fused {type(self._optimizer).__name__}: {key}=True is not supported."
                )
        if self._kind == "adam":
            beta1, beta2 = (_number(b, "betas") for b in group["betas"])
            return {
                "lr": _number(group["lr"], "lr"),
                "beta1": beta1,
                "beta2": beta2,
                "eps": _number(group["eps"], "eps"),
                "weight_decay": _number(group["weight_decay"], "weight_decay"),
                "decoupled": bool(group.get("decoupled_weight_decay", False)),
                "maximize": bool(group.get("maximize", False)),
                "amsgrad": bool(group.get("amsgrad", False)),
            }
        return {
            "lr": _number(group["lr"], "lr"),
            "momentum": _number(group["momentum"], "momentum"),
            "dampening": _number(group["dampening"], "dampening"),
            "weight_decay": _number(group["weight_decay"], "weight_decay"),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _run(self, bucket, options, average, scalars, grad_scale, found_inf, skip) -> None:
        grads = [p.grad for p in bucket.parameters]
        if any(g is None for g in grads):
            _average_without_gradient(bucket, grads, average, scalars, skip)
            bucket = _subset(bucket, [i for i, g in enumerate(grads) if g is not None])
            grads = [g for g in grads if g is not None]
            if not bucket.params:
                return
        if bucket.dtensor:
            grads = [_local(g) for g in grads]
        scale_args = (
            _on(grad_scale, bucket.params[0].device),
            _on(found_inf, bucket.params[0].device),
        )
        if self._kind == "adam":
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = self._adam_state(bucket, options)
            bucket.module.adam_average_(
                bucket.params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                bucket.shadows, *scale_args, options["lr"], options["beta1"],
                options["beta2"], options["eps"], options["weight_decay"],
                options["decoupled"], options["maximize"], average, scalars, skip,
                bucket.skipped,
            )  # fmt: skip
        else:
            buffers, new = self._sgd_state(bucket, options)
            parts = [(bucket, grads, buffers, any(new))]
            if any(new) and not all(new):
                # a parameter whose first gradient came after the others' starts its buffer
                # now (from the gradient, as torch's does): one call for the new buffers,
                # one for the rest
                parts = []
                for first_step in (True, False):
                    rows = [i for i, is_new in enumerate(new) if is_new is first_step]
                    part = [[column[i] for i in rows] for column in (grads, buffers)]
                    parts.append((_subset(bucket, rows), *part, first_step))
            for part, part_grads, part_buffers, first_step in parts:
                part.module.sgd_average_(
                    part.params, part_grads, part_buffers, part.shadows, *scale_args,
                    options["lr"], options["momentum"], options["dampening"],
                    options["weight_decay"], options["nesterov"], options["maximize"],
                    first_step, average, scalars, skip, part.skipped,
                )  # fmt: skip

    def _adam_state(self, bucket: _Bucket, options: dict):
        """The bucket's (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) as the kernels take
        them; on the first step created in torch's own format, as torch's Adam would."""
        amsgrad = options["amsgrad"]
        if bucket.state is not None and bucket.state[0] == amsgrad:
            return bucket.state[1]
        lists = ([], [], [], [])
        for p in bucket.parameters:
            s = self.state[p]
            if not s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32, device=_step_device(p))
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in s:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists[0].append(_local(s["exp_avg"]))
            lists[1].append(_local(s["exp_avg_sq"]))
            if amsgrad:
                lists[2].append(_local(s["max_exp_avg_sq"]))
            lists[3].append(s["step"])
        bucket.state = (amsgrad, lists)
        return lists

    def _sgd_state(self, bucket: _Bucket, options: dict):
        """The momentum buffers (none without momentum), and which are new (created here,
        uninitialized: torch's SGD starts a buffer from the gradient itself)."""
        if options["momentum"] == 0:
            return [], []
        state, buffers, new = self.state, [], []
        for p in bucket.parameters:
            buffer = state[p].get("momentum_buffer")
            new.append(buffer is None)
            if buffer is None:
                buffer = state[p]["momentum_buffer"] = torch.empty_like(
                    p, memory_format=torch.preserve_format
                )
            buffers.append(_local(buffer))
        return buffers, new

    # ---- what the fused optimizer does not change --------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        raise BelayInputError(
            "add_param_group() on a fused optimizer: the averager does not cover new "
            "parameters. Add the group to the optimizer first, build the averager over "
            "every parameter, then fuse the two."
        )

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict(), in torch's format."""
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this optimizer or by the plain optimizer it wraps."""
        self._optimizer.load_state_dict(state_dict)
        # torch's load makes new state and param-group objects: share them again
        self.state = self._optimizer.state
        self.param_groups = self._optimizer.param_groups
        for p, s in self.state.items():
            step = s.get("step")
            if isinstance(step, torch.Tensor) and (
                step.device != _step_device(p) or step.dtype != torch.float32
            ):
                s["step"] = step.to(device=_step_device(p), dtype=torch.float32)
        self._plan()


def _check_pair(optimizer, averager) -> str:
    """The optimizer's kind, once every refusal has been checked (nothing is changed)."""
    if isinstance(optimizer, FusedOptimizer):
        raise BelayInputError("this optimizer is already fused with an averager.")
    kind = _KINDS.get(type(optimizer))
    if kind is None:
        raise BelayInputError(
            f"fuse() takes torch.optim.AdamW, Adam or SGD; got {type(optimizer).__name__}. "
            "Other optimizers: call optimizer.step(), then averager.step()."
        )
    if not isinstance(averager, Averager):
        raise BelayInputError(f"fuse() takes an averager; got {type(averager).__name__}.")
    if type(averager)._average_at is Averager._average_at:
        raise BelayInputError(
            f"{averager.method} cannot be fused: its update is not an arithmetic of the new "
            "weights (TwoPoint copies a snapshot). Step it after the optimizer."
        )
    if averager._fused_by is not None:
        raise BelayInputError(f"this {averager.method} is already fused with an optimizer.")
    if any(t.full_weights is not None for t in averager._tracks):
        raise BelayInputError(
            "fuse() needs the whole shadow of every parameter on each rank; "
            "shard_shadow=True keeps 1/world of it. Build the averager without shard_shadow."
        )
    for group in optimizer.param_groups:
        for key in _REQUIRED_FALSE:
            if group.get(key, False):
                raise BelayInputError(
                    f"fuse(): {type(optimizer).__name__}({key}=True) is not supported: the "
                    + (
                        "fused step is not differentiable."
                        if key == "differentiable"
                        else "fused step reads the step counts on the host (CUDA graphs: no)."
                    )
                )
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    averaged = averager._parameters
    stepped_ids, averaged_ids = {id(p) for p in stepped}, {id(p) for p in averaged}
    names = dict(zip(map(id, averager._parameters), _parameter_names(averager)))
    not_averaged = [p for p in stepped if id(p) not in averaged_ids]
    not_stepped = [names[id(p)] for p in averaged if id(p) not in stepped_ids]
    if not_averaged:
        shapes = ", ".join(str(tuple(p.shape)) for p in not_averaged[:3])
        raise BelayInputError(
            f"fuse(): the optimizer steps {len(not_averaged)} parameter(s) the averager does "
            f"not average (shapes {shapes}); build the averager over the same parameters."
        )
    if not_stepped:
        raise BelayInputError(
            f"fuse(): the averager averages parameters the optimizer does not step: "
            f"{not_stepped[:5]}. Give the optimizer every parameter, or build the averager "
            "with include_frozen=False (frozen parameters) over the optimizer's parameters."
        )
    twice = [p for p in stepped if _FUSED_PARAMS.get(id(p), _dead)() is not None]
    if twice:
        raise BelayInputError(
            f"fuse(): {len(twice)} parameter(s) are already in another fused pair; a "
            "parameter can be stepped by one fused optimizer only."
        )
    for p in stepped:
        if p.is_complex():
            raise BelayInputError("fuse(): complex parameters are not supported.")
    return kind


def _dead() -> None:
    return None


def _parameter_names(averager: Averager) -> list[str]:
    ids = {id(t): n for track in averager._tracks for n, t in zip(track.names, track.live)}
    return [ids.get(id(p), "?") for p in averager._parameters]


def _shadow_places(averager: Averager) -> dict[int, tuple[Track, int]]:
    """Each averaged tensor's (track, index in the track)."""
    return {id(t): (track, i) for track in averager._tracks for i, t in enumerate(track.live)}


def _average_without_gradient(bucket: _Bucket, grads, average, scalars, skip) -> None:
    """Parameters without a gradient this step: the optimizer skips them (as torch's does),
    the averager still averages them (as its own step() would), by the reference: a
    parameter no loss reached is rare, not a hot path."""
    missing = [i for i, g in enumerate(grads) if g is None]
    params = [bucket.params[i] for i in missing]
    n, k = len(bucket.params), len(bucket.shadows) // len(bucket.params)
    shadows = [bucket.shadows[j * n + i] for j in range(k) for i in missing]
    befores = [p.clone() for p in params] if average == "poster" else None
    reference.average_(average, scalars, params, befores, shadows, skip, bucket.skipped)


def _subset(bucket: _Bucket, rows: list[int]) -> _Bucket:
    n = len(bucket.params)
    k = len(bucket.shadows) // n if n else 0
    return _Bucket(
        module=bucket.module,
        parameters=[bucket.parameters[i] for i in rows],
        params=[bucket.params[i] for i in rows],
        shadows=[bucket.shadows[j * n + i] for j in range(k) for i in rows],
        skipped=bucket.skipped,
        dtensor=bucket.dtensor,
    )


def _number(value, name: str) -> float:
    """A hyperparameter as a Python float (a tensor is read: on the host, no cost on CPU)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise BelayInputError(f"fused optimizer: {name} must be one number, got {value!r}.")
        return float(value.item())
    return float(value)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _step_device(p: torch.Tensor) -> torch.device:
    """Where a parameter's step count lives: on the CPU for CPU parameters (torch's own
    format), on the device otherwise, so that a kernel that skips a step for GradScaler
    leaves it unchanged there without a host synchronisation (torch's fused format)."""
    return torch.device("cpu") if p.device.type == "cpu" else p.device


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what the kernels write); any other tensor as it is."""
    return t._local_tensor if distributed.is_dtensor(t) else t
