"""Fuzzing the promises with hypothesis: a state machine drives the averagers through random
sequences (steps, optimizer moves, non-finite weights, ``averaged()``, checkpoint round
trips that carry on with the restored averager, ``copy_to``, models with BatchNorm whose
running statistics move) against a float64 oracle: each update from docs/methods.md in
float64, the decay from the schedule's formula written here (not the library's
``decay_at``), and the counters (steps, updates, skipped elements, the snapshot's age) kept
by the machine itself; a bad-input fuzzer calls the ops with random good and bad
arguments, snapshots every tensor before, and asserts that any refusal is a
BelayInputError that left every tensor bit for bit as it was.

In CI each test is bounded: derandomized (a fixed seed) and a few hundred examples. For a
long local run, ``BELAY_FUZZ=long`` (minutes per test: ``BELAY_FUZZ_MINUTES``, default 5)
runs fresh random batches until the time is spent, and prints how many cases and steps ran.
"""

from __future__ import annotations

import copy
import io
import os
import time

import pytest
import torch
from _untouched import Snapshot, bits, cpu_backends
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch import nn

import belay_kernels as bk
from belay_kernels import BelayInputError, ops
from belay_kernels.testing import tolerance

LONG = os.environ.get("BELAY_FUZZ") == "long"
MINUTES = float(os.environ.get("BELAY_FUZZ_MINUTES", "5"))
BACKENDS = cpu_backends()
COUNTS = {"machine cases": 0, "machine steps": 0, "bad-input cases": 0, "refused": 0}


def _bounded(max_examples, **extra):
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        **extra,
    )


def _run(test, ci_settings, long_batch):
    """CI: one derandomized run. Long: fresh random batches until the time is spent."""
    if not LONG:
        test(ci_settings)
        return
    end = time.monotonic() + MINUTES * 60
    while time.monotonic() < end:
        test(settings(ci_settings, derandomize=False, max_examples=long_batch))
    print(f"\nfuzz counts after {MINUTES} min: {COUNTS}")


# --- the averagers against a float64 oracle -----------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


BN_FEATURES = 5


def _model(specs, seed, bn_dtype=None):
    """A module with one parameter per (shape, dtype, layout) spec, and a BatchNorm of
    ``bn_dtype`` (when given) whose running statistics are floating buffers."""
    g = torch.Generator().manual_seed(seed)
    module = nn.Module()
    if bn_dtype is not None:
        module.bn = nn.BatchNorm1d(BN_FEATURES, dtype=bn_dtype)
        with torch.no_grad():  # not the zeros and ones a fresh BatchNorm starts from
            module.bn.running_mean.copy_(torch.randn(BN_FEATURES, generator=g))
            module.bn.running_var.copy_(torch.rand(BN_FEATURES, generator=g) + 0.5)
    for i, (n, dtype, layout) in enumerate(specs):
        data = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
        if layout == "transposed":  # not contiguous: the tensor-list path
            data = data.t()
        elif layout == "view":  # shares a larger storage: the tensor-list path
            data = torch.cat([data.reshape(-1), data.reshape(-1)])[: n * 3].view(n, 3)
        module.register_parameter(f"p{i}", nn.Parameter(data))
    if len(specs) > 1 and specs[0][1] == specs[1][1] and specs[0][2] == "plain":
        module.tied = module.p0  # a tied parameter, counted once
    return module


def _rounded(x, dtype):
    return x.to(dtype).double()


def _warmup_decay(t, decay, gamma, power, min_decay):
    """docs/methods.md: ``1 - (1 + t / gamma)^(-power)``, clamped to ``[min_decay, decay]``."""
    return min(max(1.0 - (1.0 + t / gamma) ** -power, min_decay), decay)


class AveragerMachine(RuleBasedStateMachine):
    @initialize(
        method=st.sampled_from(["EMA", "SWA", "Belay", "TwoPoint", "Warmup"]),
        specs=st.lists(
            st.tuples(
                st.integers(1, 9),
                st.sampled_from(DTYPES),
                st.sampled_from(["plain", "plain", "transposed", "view"]),
            ),
            min_size=1,
            max_size=4,
        ),
        backend=st.sampled_from(["auto"] + BACKENDS),
        flatten=st.booleans(),
        nonfinite=st.sampled_from(["skip", "propagate"]),
        seed=st.integers(0, 2**16),
        rates=st.tuples(
            st.sampled_from([0.0, 0.1, 0.5, 0.75, 0.999, 1.0]),
            st.sampled_from([0.0, 0.3, 0.5, 1.0]),
        ),
        # (gamma, power, min_decay) of the Warmup schedule
        warmup=st.tuples(
            st.sampled_from([0.5, 3.0, 10.0]),
            st.sampled_from([0.5, 0.75, 1.0, 2 / 3]),
            st.sampled_from([0.0, 0.2, 0.45]),
        ),
        bn_dtype=st.sampled_from([None, None, torch.float32, torch.float64]),
    )
    def build(self, method, specs, backend, flatten, nonfinite, seed, rates, warmup, bn_dtype):
        COUNTS["machine cases"] += 1
        self.model = _model(specs, seed, bn_dtype)
        self.buffer_names = {n for n, b in self.model.named_buffers() if b.is_floating_point()}
        self.method = method
        self.nonfinite = nonfinite
        self.rates = rates
        gamma, power, min_decay = warmup
        self.warmup = dict(decay=max(rates[0], 0.5), gamma=gamma, power=power, min_decay=min_decay)
        # the oracle's own counters, never read back from an averager
        self.steps = self.updates = self.skipped = self.snapshot_step = 0
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.options = dict(flatten=flatten, nonfinite=nonfinite)
        self.backend = backend
        try:
            self.averager = self._make(self.model, backend)
        except BelayInputError as exc:
            # a named backend that could not run some track: refused before anything moved
            assert "step() could not run" in str(exc)
            self.backend = "torch"
            self.averager = self._make(self.model, "torch")

    def _make(self, model, backend):
        decay, beta = self.rates
        kwargs = dict(self.options, backend=backend)
        if self.method == "EMA":
            return bk.EMA(model, decay=decay, **kwargs)
        if self.method == "Warmup":
            return bk.EMA(model, decay=bk.schedules.Warmup(**self.warmup), **kwargs)
        if self.method == "SWA":
            return bk.SWA(model, **kwargs)
        if self.method == "Belay":
            return bk.Belay(model, alpha=1 - decay, beta=beta, **kwargs)
        return bk.TwoPoint(model, gap=2, **kwargs)

    def _state(self):
        names = self.averager.names()
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return names, [tensors[n] for n in names], self.averager.shadow_params()

    def _averaged_tensors(self):
        return list(self.model.parameters()) + [
            b for n, b in self.model.named_buffers() if n in self.buffer_names
        ]

    @rule(scale=st.sampled_from([1e-3, 0.1, 10.0]))
    def optimizer_moves(self, scale):
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(
                    (torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * scale).to(
                        p.dtype
                    )
                )

    @rule(
        which=st.integers(0, 100),
        value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    )
    def a_weight_goes_nonfinite(self, which, value):
        params = self._averaged_tensors()
        p = params[which % len(params)]
        index = torch.unravel_index(torch.tensor(which % p.numel()), p.shape)
        with torch.no_grad():
            p[tuple(int(i) for i in index)] = value

    @rule()
    def heal(self):
        with torch.no_grad():
            for p in self._averaged_tensors():
                p.nan_to_num_(0.0, 0.0, 0.0)
            for s in self.averager.shadow_params():
                s.nan_to_num_(0.0, 0.0, 0.0)

    @precondition(lambda self: self.buffer_names)
    @rule(shift=st.sampled_from([-2.0, 0.0, 3.0]))
    def a_forward_moves_the_running_statistics(self, shift):
        bn = self.model.bn
        x = torch.randn(7, BN_FEATURES, generator=self.gen, dtype=torch.float64) * 2 + shift
        bn.train()
        with torch.no_grad():
            bn(x.to(bn.running_mean.dtype))

    @rule()
    def step(self):
        COUNTS["machine steps"] += 1
        names, live, shadows = self._state()
        t = self.steps
        raw0 = [p.detach().clone() for p in live]
        w0 = [w.double() for w in raw0]
        s0 = [s.double().clone() for s in shadows]
        self.averager.step()
        self.steps += 1
        if self.method == "TwoPoint":  # gap 2: the snapshot is retaken after odd steps
            if (t + 1) % 2 == 0:
                self.updates += 1
                self.snapshot_step = t + 1
                for w, s in zip(w0, shadows):
                    assert torch.equal(bits(s.double()), bits(w)) or torch.equal(s.double(), w)
            return
        if self.method == "EMA":
            rate = 1 - self.rates[0]
        elif self.method == "Warmup":
            rate = 1 - _warmup_decay(t, **self.warmup)
        elif self.method == "SWA":
            rate = 1 / (self.updates + 1)
        else:  # Belay: alpha, for the parameters and the buffers alike
            rate = 1 - self.rates[0]
        self.updates += 1
        for name, p, s, raw, w, sb in zip(names, live, shadows, raw0, w0, s0):
            if self.method == "Belay" and name in self.buffer_names:
                # running statistics are averaged, never pulled
                assert torch.equal(bits(p.detach()), bits(raw)), f"buffer {name} was pulled"
            elif self.method == "Belay":
                beta = self.rates[1]
                exp_w = sb.clone() if beta == 1 else w + beta * (sb - w)
                if beta < 1:  # a non-finite weight stays non-finite (NaN or inf)
                    stuck = ~torch.isfinite(w)
                    assert not torch.isfinite(p.detach().double()[stuck]).any()
                    exp_w = torch.where(stuck, p.detach().double(), exp_w)
                self._close(p.detach(), exp_w)
            exp_s = sb + rate * (w - sb) if rate != 1 else w.clone()
            bad = ~torch.isfinite(w)
            if self.nonfinite == "skip":
                self.skipped += int(bad.sum())
                exp_s = torch.where(bad, sb, exp_s)
            else:  # propagate: a non-finite weight gives a non-finite shadow (NaN or inf)
                if rate > 0:
                    assert not torch.isfinite(s.double()[bad]).any()
                exp_s = torch.where(bad, s.double(), exp_s)
            self._close(s, exp_s)

    def _close(self, actual, expected):
        torch.testing.assert_close(
            actual.double(),
            _rounded(expected, actual.dtype),
            equal_nan=True,
            **{k: 4 * v for k, v in tolerance(actual.dtype).items()},
        )

    @rule()
    def evaluate_averaged(self):
        names, live, shadows = self._state()
        before = [s.clone() for s in shadows]
        snap = Snapshot(live, shadows)
        try:
            with self.averager.averaged():
                if self.method != "TwoPoint":
                    for p, s in zip(live, before):
                        if p.dtype == s.dtype:  # the model holds the shadow, bit for bit
                            assert torch.equal(bits(p.detach()), bits(s))
        except BelayInputError as exc:
            assert "cannot swap" in str(exc)
        snap.assert_unchanged()  # restored bit for bit (or never swapped)

    @rule()
    def checkpoint_round_trip(self):
        # through bytes, as a checkpoint file would be, and loaded with weights_only=True
        buffer = io.BytesIO()
        torch.save(self.averager.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        twin_model = copy.deepcopy(self.model)
        twin = self._make(twin_model, self.backend)
        twin.load_state_dict(state)
        for a, b in zip(self.averager.shadow_params(), twin.shadow_params()):
            assert torch.equal(bits(a), bits(b))
        # the rest of the run goes on with the restored averager: the oracle's counters
        # (checked after every rule) must hold for it
        self.model, self.averager = twin_model, twin

    @rule()
    def copy_to_a_twin(self):
        target = copy.deepcopy(self.model)
        self.averager.copy_to(target)
        averaged = self.averager._averaged_values()
        targets = dict(target.named_parameters()) | dict(target.named_buffers())
        for name, value in zip(self.averager.names(), averaged):
            assert (
                torch.equal(
                    targets[name].detach().double(), value.detach().to(targets[name].dtype).double()
                )
                or value.isnan().any()
            )

    # (TwoPoint's steps between snapshots touch nothing, so have nothing to refuse)
    @precondition(lambda self: self.averager.num_steps > 0 and self.method != "TwoPoint")
    @rule()
    def a_refused_step_changes_nothing(self):
        # a live tensor replaced behind the averager's back: step() must refuse, untouched
        names, live, shadows = self._state()
        snap = Snapshot(live, shadows, list(self.averager._skipped.values()))
        counters = (self.averager.num_steps, self.averager.num_updates)
        held = [p.data for p in live]
        live[-1].data = torch.zeros(live[-1].numel() + 1, dtype=live[-1].dtype)
        try:
            with pytest.raises(BelayInputError):
                self.averager.step()
        finally:
            for p, d in zip(live, held):
                p.data = d
        snap.assert_unchanged()
        assert (self.averager.num_steps, self.averager.num_updates) == counters

    @invariant()
    def counters_agree_with_the_oracle(self):
        if hasattr(self, "averager"):
            averager = self.averager
            assert averager.num_steps == self.steps
            assert averager.num_updates == self.updates
            assert averager.num_skipped == self.skipped
            if self.method == "TwoPoint":
                assert averager.snapshot_age == self.steps - self.snapshot_step


def test_averagers_agree_with_a_float64_oracle_in_random_sequences():
    # 250 runs of up to 25 rules: about 860 steps and 850 round trips in all, some 4.5 s on
    # a 2-core machine. At 80 runs of up to 10 rules (1.2 s) only 53 steps ran, too few to
    # meet a checkpoint after a skipped weight or a warm-up step past t = 0.
    def once(s):
        run_state_machine_as_test(AveragerMachine, settings=settings(s, stateful_step_count=25))

    _run(once, _bounded(250), long_batch=100)


# --- bad input: refused with BelayInputError, nothing written ----------------------------

OPS = ("ema", "swa", "belay", "two_point", "swap")


@st.composite
def tensor_args(draw, n_rows):
    """Each row's tensors, from good ones to every kind of bad one, some sharing memory."""
    n = draw(st.integers(1, 40))
    buf = torch.randn(4 * n + 8, dtype=torch.float64)
    kinds = ["good"] * 6 + [
        "expanded",
        "slice",
        "int",
        "short",
        "meta",
        "strided",
        "fp16",
        "bf16",
        "fp64",
        "same",
    ]
    made = []

    def one():
        kind = draw(st.sampled_from(kinds))
        if kind == "good":
            return torch.randn(n)
        if kind == "expanded":
            return torch.randn(1).expand(n)
        if kind == "slice":  # a slice of one shared buffer: may overlap another
            start = draw(st.integers(0, 3 * n + 8))
            return buf[start : start + n].float() if draw(st.booleans()) else buf[start : start + n]
        if kind == "int":
            return torch.arange(n)
        if kind == "short":
            return torch.randn(max(n - 1, 0))
        if kind == "meta":
            return torch.empty(n, device="meta")
        if kind == "strided":
            return torch.randn(2 * n)[::2]
        if kind == "same" and made:
            return draw(st.sampled_from(made))
        return torch.randn(n).to(
            {"fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}.get(
                kind, torch.float32
            )
        )

    rows = []
    for _ in range(n_rows):
        row = []
        for _ in range(3):
            t = one()
            made.append(t)
            row.append(t)
        rows.append(row)
    return rows


HPARAMS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.sampled_from([10**30, -(10**30), 2**63 - 1, 2**63 - 2, True, "0.5", None]),
    st.builds(
        lambda v, shape, dtype: torch.full(shape, v).to(dtype),
        st.floats(-2, 2) | st.just(float("nan")),
        st.sampled_from([(), (1,), (1, 1), (2,)]),
        st.sampled_from(
            [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.float16]
        ),
    ),
)


@st.composite
def bad_calls(draw):
    op = draw(st.sampled_from(OPS))
    as_list = draw(st.booleans())
    rows = draw(tensor_args(draw(st.integers(1, 3)) if as_list else 1))
    columns = [list(c) for c in zip(*rows)]
    args = columns if as_list else [c[0] for c in columns]
    skipped = draw(st.sampled_from([None, "good", "float", "shaped"]))
    skipped = {
        None: None,
        "good": torch.zeros((), dtype=torch.int64),
        "float": torch.zeros(()),
        "shaped": torch.zeros(2, dtype=torch.int64),
    }[skipped]
    common = dict(backend=draw(st.sampled_from(["auto", "bogus"] + BACKENDS)))
    update = dict(
        common, nonfinite=draw(st.sampled_from(["skip", "propagate", "drop"])), skipped=skipped
    )
    h1, h2 = draw(HPARAMS), draw(HPARAMS)
    if op == "ema":
        return ops.ema_update_, args[:2], dict(update, decay=h1)
    if op == "swa":
        return ops.swa_update_, args[:2], dict(update, count=h1)
    if op == "belay":
        return ops.belay_step_, args[:2], dict(update, alpha=h1, beta=h2)
    if op == "two_point":
        return ops.two_point_average, args[:2], dict(common, out=args[2])
    return ops.swap_, args[:2], dict(common, inverse=draw(st.booleans()))


def test_bad_input_is_refused_before_anything_is_written():
    def once(s):
        @s
        @hypothesis_given(bad_calls())
        def check(call):
            COUNTS["bad-input cases"] += 1
            fn, args, kwargs = call
            real = [
                t for t in Snapshot(args, list(kwargs.values())).tensors if t.device.type != "meta"
            ]
            snap = Snapshot(real)
            try:
                fn(*args, **kwargs)
            except BelayInputError:
                COUNTS["refused"] += 1
                snap.assert_unchanged()

        check()

    _run(once, _bounded(400), long_batch=500)


def hypothesis_given(*strategies):
    from hypothesis import given

    return given(*strategies)
