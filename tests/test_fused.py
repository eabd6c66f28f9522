"""``belay_kernels.fuse``: the fused optimizer against torch's own optimizer
(``foreach=False``) followed by the averager's ``step()``, bit for bit, on every backend
here that has the fused ops; with a cosine LR schedule, odd sizes, a floating buffer,
every dtype pair, a parameter without a gradient, a checkpoint round trip through a plain
``torch.optim.AdamW``, GradScaler, and every refusal leaving everything as it was.

The reference and the torch backend run torch's own ops: torch's bits everywhere. The
compiled kernels give them where ``_fused_exactness`` says (ATen's fused multiply-adds, a
correctly rounded sqrt, no 16-bit add with alpha); elsewhere they are compared within a
bound: an ulp's difference per op, grown over the steps through the optimizer's state."""

import copy

import pytest
import torch
from _fused_exactness import compiled_is_exact
from torch import nn

import belay_kernels as bk
from belay_kernels import _backends

STEPS = 5


def _fused_backends() -> list[str]:
    names = []
    for name in ("reference", "torch", "cpp"):
        status = _backends._load(name)
        if status.available and hasattr(status.module, "adam_average_"):
            names.append(name)
    return names


BACKENDS = _fused_backends()


class Odd(nn.Module):
    """Sizes that fill no vector evenly, a floating buffer updated in forward, and a
    parameter that no loss reaches (it has no gradient)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 3)
        self.unused = nn.Parameter(torch.randn(5))
        self.register_buffer("running", torch.zeros(13))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            self.running.mul_(0.9).add_(0.1 * h.detach().float().mean(0).to(self.running.dtype))
        return self.b(h)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Odd().to(dtype)


AVERAGERS = {
    "ema": lambda m, **o: bk.EMA(m, decay=bk.schedules.Warmup(decay=0.99), every=2, **o),
    "swa": lambda m, **o: bk.SWA(m, start=1, **o),
    "belay": lambda m, **o: bk.Belay(m, alpha=0.1, beta=0.05, **o),
    "power": lambda m, **o: bk.PowerEMA(m, gamma=7.0, **o),
    "posthoc": lambda m, **o: bk.PostHocEMA(
        m, sigma_rels=(0.05, 0.1), snapshot_every=10_000, snapshot_dir=o.pop("tmp"), **o
    ),
}
OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adam": lambda p: torch.optim.Adam(
        p, lr=0.01, weight_decay=0.01, maximize=True, amsgrad=True, foreach=False
    ),
    "sgd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False
    ),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, foreach=False),
    "plain-sgd": lambda p: torch.optim.SGD(p, lr=0.05, foreach=False),
    # fp16 weights: an eps that fp16 holds (1e-8 rounds to 0 there, and Adam's moments of
    # these gradients underflow: 0 / 0)
    "adamw-fp16": lambda p: torch.optim.AdamW(
        p, lr=0.01, weight_decay=0.1, eps=1e-3, foreach=False
    ),
}


def _batch(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(9, 7, generator=g).to(dtype)


def _train(model, optimizer, step, dtype, scheduler=None, averager=None):
    optimizer.zero_grad()
    model(_batch(step, dtype)).float().square().mean().backward()
    optimizer.step()
    if averager is not None:
        averager.step()
    if scheduler is not None:
        scheduler.step()


def _options(averager_name, tmp_path, backend, **more):
    options = {"backend": backend, **more}
    if averager_name == "posthoc":
        options["tmp"] = tmp_path
    return options


def _pair(averager_name, optimizer_name, tmp_path, backend, dtype=torch.float32, **more):
    """(model, optimizer, averager), unfused and fused, from the same start."""
    runs = []
    for fused in (False, True):
        model = _model(dtype)
        averager = AVERAGERS[averager_name](
            model, **_options(averager_name, tmp_path / str(fused), backend, **more)
        )
        optimizer = OPTIMIZERS[optimizer_name](model.parameters())
        if fused:
            optimizer = bk.fuse(optimizer, averager)
        runs.append((model, optimizer, averager))
    return runs


def _state(model, averager):
    return list(model.state_dict().values()) + [
        t for k in range(len(getattr(averager, "gammas", [0]))) for t in _profile(averager, k)
    ]


def _profile(averager, k):
    return averager._profile(k) if hasattr(averager, "_profile") else averager.shadow_params()


# Within BOUND * eps of the weights' dtype, relative and absolute, where not bit for bit
# (a shadow follows its weights: an fp32 shadow of bf16 weights inherits their ulps).
BOUND = 16


def _assert_same(ours, theirs, exact=True, dtype=torch.float32):
    eps = torch.finfo(dtype).eps
    for a, b in zip(ours, theirs, strict=True):
        if exact:
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=BOUND * eps, atol=BOUND * eps)


def _exact(backend, optimizer_name="adamw", dtype=torch.float32):
    """Whether ``backend`` must give torch's bits here (see ``_fused_exactness``)."""
    if backend != "cpp":
        return True
    kind = "adam" if optimizer_name.startswith("adam") else "sgd"
    return compiled_is_exact(kind, dtype, coupled_decay=optimizer_name == "adam")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("averager_name", list(AVERAGERS))
def test_fused_is_the_optimizer_then_the_averager(backend, optimizer_name, averager_name, tmp_path):
    (m0, o0, a0), (m1, o1, a1) = _pair(averager_name, optimizer_name, tmp_path, backend)
    s0 = torch.optim.lr_scheduler.CosineAnnealingLR(o0, T_max=STEPS)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=STEPS)
    for step in range(STEPS):
        _train(m0, o0, step, torch.float32, s0, a0)
        _train(m1, o1, step, torch.float32, s1)
    _assert_same(_state(m1, a1), _state(m0, a0), _exact(backend, optimizer_name))
    assert (a1.num_steps, a1.num_updates) == (a0.num_steps, a0.num_updates)
    assert o1.param_groups[0]["lr"] == o0.param_groups[0]["lr"]


DTYPE_SETUPS = [
    (torch.bfloat16, None),  # the default fp32 shadow
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, None),
    (torch.float16, torch.float16),
    (torch.float64, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shadow_dtype", DTYPE_SETUPS)
@pytest.mark.parametrize("optimizer_name,averager_name", [("adamw", "ema"), ("sgd", "belay")])
@pytest.mark.parametrize("flatten", [True, False])
def test_every_dtype_pair_and_both_layouts(
    backend, dtype, shadow_dtype, optimizer_name, averager_name, flatten, tmp_path
):
    if dtype == torch.float16 and optimizer_name == "adamw":
        optimizer_name = "adamw-fp16"
    runs = _pair(
        averager_name, optimizer_name, tmp_path, backend, dtype,
        shadow_dtype=shadow_dtype, flatten=flatten,
    )  # fmt: skip
    (m0, o0, a0), (m1, o1, a1) = runs
    for step in range(STEPS):
        _train(m0, o0, step, dtype, averager=a0)
        _train(m1, o1, step, dtype)
    assert all(torch.isfinite(t).all() for t in _state(m0, a0))  # a run worth comparing
    _assert_same(_state(m1, a1), _state(m0, a0), _exact(backend, optimizer_name, dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_goes_through_a_plain_adamw_and_back(backend, tmp_path):
    """Fused for 2 steps, plain AdamW + EMA.step() for 2, fused again for 2: the same bits
    as fused throughout, so the optimizer's state_dict() is torch's own format."""
    (_, _, _), (m_ref, o_ref, a_ref) = _pair("ema", "adamw", tmp_path, backend)
    for step in range(6):
        _train(m_ref, o_ref, step, torch.float32)

    model = _model()
    averager = bk.EMA(model, decay=bk.schedules.Warmup(decay=0.99), every=2, backend=backend)
    optimizer = bk.fuse(OPTIMIZERS["adamw"](model.parameters()), averager)
    for step in range(2):
        _train(model, optimizer, step, torch.float32)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "avg": averager.state_dict()}
    )

    plain_model = _model(seed=1)
    plain_model.load_state_dict(saved["model"])
    plain_avg = bk.EMA(plain_model, decay=bk.schedules.Warmup(decay=0.99), every=2)
    plain_avg.load_state_dict(saved["avg"])
    plain = OPTIMIZERS["adamw"](plain_model.parameters())
    plain.load_state_dict(saved["opt"])
    for step in range(2, 4):
        _train(plain_model, plain, step, torch.float32, averager=plain_avg)
    saved = copy.deepcopy(
        {
            "model": plain_model.state_dict(),
            "opt": plain.state_dict(),
            "avg": plain_avg.state_dict(),
        }
    )

    model = _model(seed=2)
    model.load_state_dict(saved["model"])
    averager = bk.EMA(model, decay=bk.schedules.Warmup(decay=0.99), every=2, backend=backend)
    averager.load_state_dict(saved["avg"])
    optimizer = bk.fuse(OPTIMIZERS["adamw"](model.parameters()), averager)
    optimizer.load_state_dict(saved["opt"])
    for step in range(4, 6):
        _train(model, optimizer, step, torch.float32)
    _assert_same(_state(model, averager), _state(m_ref, a_ref), _exact(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradscaler_unscales_in_the_kernel_and_skips_a_step_with_an_inf(backend, tmp_path):
    """Scaled losses: the fused kernels unscale as GradScaler.unscale_ would; on the step
    whose gradients hold an inf the fused step writes nothing (weights, moments, shadows),
    where unfused, GradScaler skips the optimizer and the averager is not stepped."""
    (m0, o0, a0), (m1, o1, a1) = _pair("ema", "adamw", tmp_path, backend)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    runs = ((m0, o0, scalers[0], a0), (m1, o1, scalers[1], None))
    inf_step = 2
    for step in range(4):
        for model, optimizer, scaler, averager in runs:
            optimizer.zero_grad()
            loss = model(_batch(step, torch.float32)).square().mean()
            scaler.scale(loss * (float("inf") if step == inf_step else 1.0)).backward()
            held = [p.clone() for p in model.parameters()] + [
                s.clone() for n, s in zip(a1.names(), a1.shadow_params()) if n != "running"
            ]
            scaler.step(optimizer)
            scaler.update()
            if averager is not None and step != inf_step:
                averager.step()
            if averager is None and step == inf_step:
                now = list(model.parameters()) + [
                    s for n, s in zip(a1.names(), a1.shadow_params()) if n != "running"
                ]
                _assert_same(now, held)
        if step == inf_step:  # the unfused averager was not stepped; the counts agree
            a0._steps += 1
    assert scalers[0].get_scale() == scalers[1].get_scale()
    # the fused run still averaged the buffer on the skipped step: compare the rest
    ours = [t for n, t in zip(a1.names(), a1.shadow_params()) if n != "running"]
    theirs = [t for n, t in zip(a0.names(), a0.shadow_params()) if n != "running"]
    _assert_same(ours + list(m1.parameters()), theirs + list(m0.parameters()), _exact(backend))


def test_the_averagers_own_step_refuses_once_fused():
    model = _model()
    ema = bk.EMA(model, decay=0.9)
    optimizer = bk.fuse(torch.optim.AdamW(model.parameters()), ema)
    with pytest.raises(bk.BelayInputError, match="fused optimizer's step"):
        ema.step()
    assert ema.num_steps == 0
    assert isinstance(optimizer, torch.optim.Optimizer)


def test_the_poster_form_steps_only_fused():
    model = _model()
    belay = bk.Belay(model, alpha=0.1, beta=0.05, form="poster")
    with pytest.raises(bk.BelayInputError, match="only a fused step"):
        belay.step()
    optimizer = bk.fuse(torch.optim.SGD(model.parameters(), lr=0.1), belay)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    shadow = {n: s.clone() for n, s in zip(belay.names(), belay.shadow_params())}
    _train(model, optimizer, 0, torch.float32)
    # the shadow followed the weights from before the step
    for name, s in zip(belay.names(), belay.shadow_params()):
        if name in before:
            expected = shadow[name].lerp(before[name], 0.1)
            assert torch.equal(s, expected), name


def _untouched(model, averager):
    return [t.clone() for t in _state(model, averager)]


def _refused(make_optimizer, make_averager, match):
    model = _model()
    averager = make_averager(model)
    optimizer = make_optimizer(model)
    before = _untouched(model, averager)
    with pytest.raises(bk.BelayInputError, match=match):
        bk.fuse(optimizer, averager)
    _assert_same(_untouched(model, averager), before)
    assert averager._fused_by is None
    averager.step()  # still steps on its own


@pytest.mark.parametrize(
    "make_optimizer, make_averager, match",
    [
        (
            lambda m: torch.optim.RMSprop(m.parameters()),
            lambda m: bk.EMA(m),
            "takes torch.optim.AdamW, Adam or SGD",
        ),
        (
            lambda m: torch.optim.AdamW(m.parameters(), differentiable=True),
            lambda m: bk.EMA(m),
            "differentiable=True",
        ),
        (
            lambda m: torch.optim.AdamW(m.parameters(), capturable=True),
            lambda m: bk.EMA(m),
            "capturable=True",
        ),
        (
            lambda m: torch.optim.AdamW(m.a.parameters()),
            lambda m: bk.EMA(m),
            "does not step",
        ),
        (
            lambda m: torch.optim.AdamW(m.parameters()),
            lambda m: bk.EMA(m.a),
            "does not average",
        ),
        (
            lambda m: torch.optim.AdamW(m.parameters()),
            lambda m: bk.TwoPoint(m, gap=2),
            "TwoPoint",
        ),
    ],
    ids=["rmsprop", "differentiable", "capturable", "not-stepped", "not-averaged", "two-point"],
)
def test_bad_pairs_are_refused_with_nothing_changed(make_optimizer, make_averager, match):
    _refused(make_optimizer, make_averager, match)


def test_a_parameter_in_two_fused_pairs_is_refused():
    model = _model()
    first = bk.fuse(torch.optim.AdamW(model.parameters()), bk.EMA(model))
    _refused_second = bk.EMA(model)
    with pytest.raises(bk.BelayInputError, match="already in another fused pair"):
        bk.fuse(torch.optim.SGD(model.parameters(), lr=0.1), _refused_second)
    assert _refused_second._fused_by is None
    with pytest.raises(bk.BelayInputError, match="already fused"):
        bk.fuse(first, bk.EMA(_model()))


def test_add_param_group_is_refused():
    model = _model()
    optimizer = bk.fuse(torch.optim.AdamW(model.parameters()), bk.EMA(model))
    with pytest.raises(bk.BelayInputError, match="add_param_group"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2))]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    "optimizer_name,averager_name", [("adamw", "ema"), ("sgd", "belay"), ("adam", "posthoc")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_device_within_the_stated_bound(
    backend, optimizer_name, averager_name, dtype, tmp_path
):
    """On a GPU the kernels contract multiply-adds and take the bias corrections on the
    device: not torch's CPU bits, so within a bound of a few ulps of the weights' dtype per
    step (fp32: rtol 1e-5; bf16: two bf16 ulps), against torch's optimizer then the
    averager on the same device; and a found inf writes nothing, without a host sync."""
    if _backends._load(backend).module is None:
        pytest.skip(f"backend {backend} unavailable: {_backends._load(backend).reason}")
    runs = []
    for fused in (False, True):
        model = _model(dtype).cuda()
        averager = AVERAGERS[averager_name](
            model, **_options(averager_name, tmp_path / str(fused), backend)
        )
        optimizer = OPTIMIZERS[optimizer_name](model.parameters())
        if fused:
            optimizer = bk.fuse(optimizer, averager)
        runs.append((model, optimizer, averager))
    (m0, o0, a0), (m1, o1, a1) = runs
    for step in range(STEPS):
        for model, optimizer, averager in ((m0, o0, a0), (m1, o1, None)):
            optimizer.zero_grad()
            model(_batch(step, dtype).cuda()).float().square().mean().backward()
            optimizer.step()
            if averager is not None:
                averager.step()
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-3}
    )
    for ours, theirs in zip(_state(m1, a1), _state(m0, a0), strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), **tolerance)
    held = [p.clone() for p in m1.parameters()]
    o1.zero_grad()
    m1(_batch(0, dtype).cuda()).float().square().mean().backward()
    o1.found_inf = torch.ones((), device="cuda")
    o1.step()
    del o1.found_inf
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), held))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_lr_is_read_each_step(backend, tmp_path):
    """A 0-d tensor ``lr`` (changed in place between steps) is read as a number on every
    step. torch's own step does its lr arithmetic in the tensor's float32, the kernels in
    float64: the two agree to an ulp or two of fp32 over these steps, not bit for bit."""
    runs = []
    for fused in (False, True):
        model = _model()
        averager = bk.EMA(model, decay=0.9, backend=backend)
        lr = torch.tensor(0.01)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False)
        runs.append((model, bk.fuse(optimizer, averager) if fused else optimizer, averager, lr))
    for step in range(STEPS):
        for model, optimizer, averager, lr in runs:
            lr.fill_(0.01 * (STEPS - step) / STEPS)
            _train(
                model,
                optimizer,
                step,
                torch.float32,
                averager=None if averager._fused_by else averager,
            )
    (m0, _, a0, _), (m1, _, a1, _) = runs
    for ours, theirs in zip(_state(m1, a1), _state(m0, a0), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=4e-7, atol=1e-7)


def test_step_hooks_run_on_the_fused_step():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(type(opt).__name__))
    fused = bk.fuse(optimizer, bk.EMA(model))
    fused.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    _train(model, fused, 0, torch.float32)
    assert calls == ["pre", "FusedOptimizer"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_whose_first_gradient_comes_later(backend):
    """SGD with momentum starts that parameter's buffer on its first gradient (torch's way);
    until then the optimizer skips it and the averager still averages it."""
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(37)), nn.Parameter(torch.randn(5, 3))]
        averager = bk.EMA(params, decay=0.9, backend=backend)
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
        runs.append((params, bk.fuse(optimizer, averager) if fused else optimizer, averager))
    for step in range(4):
        for params, optimizer, averager in runs:
            g = torch.Generator().manual_seed(step)
            params[0].grad = torch.randn(37, generator=g)
            params[1].grad = torch.randn(5, 3, generator=g) if step >= 2 else None
            optimizer.step()
            if averager._fused_by is None:
                averager.step()
    (p0, _, a0), (p1, _, a1) = runs
    _assert_same(p1 + a1.shadow_params(), p0 + a0.shadow_params(), _exact(backend, "sgd"))
