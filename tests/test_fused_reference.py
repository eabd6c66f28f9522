"""The fused optimizer's spec (``reference.adam_average_``, ``reference.sgd_average_``)
against what it specifies: torch's own single-tensor optimizers (``foreach=False``)
followed by the averager's reference update, bit for bit; and the poster's form of BELAY
against a float64 implementation of its two equations."""

import pytest
import torch

from belay_kernels import reference

STEPS = 6
SHAPES = ((3, 5), (1,), (0,), (257,))


def _fresh(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "name,options",
    [
        ("AdamW", {"weight_decay": 0.1}),
        ("Adam", {"weight_decay": 0.01, "maximize": True}),
        ("Adam", {"amsgrad": True}),
        ("SGD", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("SGD", {}),
    ],
)
@pytest.mark.parametrize("average", ["ema", "swa", "belay"])
def test_spec_is_torch_then_the_average(dtype, name, options, average):
    ours, theirs = _fresh(dtype, 0), _fresh(dtype, 0)
    shadow_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    our_shadows = [p.to(shadow_dtype) for p in ours] * (2 if average == "ema" else 1)
    our_shadows = [s.clone() for s in our_shadows]
    their_shadows = [s.clone() for s in our_shadows]
    optimizer = getattr(torch.optim, name)(theirs, lr=0.01, foreach=False, **options)
    state = {i: {} for i in range(len(ours))}
    n = len(ours)
    for step in range(STEPS):
        grads = _grads(ours, step)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        scalars = {"ema": [0.9, 0.75], "swa": [step], "belay": [0.1, 0.05]}[average]
        for i, p in enumerate(theirs):
            if average == "ema":
                for k, decay in enumerate(scalars):
                    reference.ema_update_(their_shadows[k * n + i], p, decay)
            elif average == "swa":
                reference.swa_update_(their_shadows[i], p, step)
            else:
                reference.belay_step_(p, their_shadows[i], *scalars)
        if name == "SGD":
            momentum = options.get("momentum", 0)
            if momentum and step == 0:
                for i, p in enumerate(ours):
                    state[i]["momentum_buffer"] = torch.empty_like(p)
            buffers = [state[i]["momentum_buffer"] for i in range(n)] if momentum else []
            reference.sgd_average_(
                ours,
                [g.clone() for g in grads],
                buffers,
                our_shadows,
                None,
                None,
                0.01,
                momentum,
                options.get("dampening", 0),
                options.get("weight_decay", 0),
                options.get("nesterov", False),
                False,
                step == 0,
                average,
                scalars,
            )
        else:
            if step == 0:
                for i, p in enumerate(ours):
                    state[i] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                        "max_exp_avg_sq": torch.zeros_like(p),
                    }
            column = lambda key: [state[i][key] for i in range(n)]  # noqa: E731
            reference.adam_average_(
                ours,
                [g.clone() for g in grads],
                column("exp_avg"),
                column("exp_avg_sq"),
                column("max_exp_avg_sq") if options.get("amsgrad") else [],
                column("step"),
                our_shadows,
                None,
                None,
                0.01,
                0.9,
                0.999,
                1e-8,
                options.get("weight_decay", 0),
                name == "AdamW",
                options.get("maximize", False),
                average,
                scalars,
            )
        for a, b in zip(ours + our_shadows, theirs + their_shadows):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_poster_form_is_its_two_equations_in_float64():
    """w1 <- (1 - beta)(w1 + eta f(w1)) + beta w2 and w2 <- (1 - alpha) w2 + alpha w1,
    with plain SGD as ``eta f``, against float64 arithmetic of the equations as written."""
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(1001, generator=g)
    w2 = torch.randn(1001, generator=g)
    alpha, beta, lr = 0.05, 0.2, 0.1
    ours, shadow = w1.clone(), w2.clone()
    x1, x2 = w1.double(), w2.double()
    for _ in range(20):
        grad = torch.randn(1001, generator=g)
        reference.sgd_average_(
            [ours],
            [grad.clone()],
            [],
            [shadow],
            None,
            None,
            lr,
            0,
            0,
            0,
            False,
            False,
            False,
            "poster",
            [alpha, beta],
        )
        x1, x2 = (1 - beta) * (x1 - lr * grad.double()) + beta * x2, (1 - alpha) * x2 + alpha * x1
    # each step rounds a few times in float32; the two mix, so the error stays a few ulps
    torch.testing.assert_close(ours.double(), x1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shadow.double(), x2, rtol=1e-6, atol=1e-6)


def test_found_inf_writes_nothing():
    params, exp_avg, exp_avg_sq = [torch.randn(7)], [torch.zeros(7)], [torch.zeros(7)]
    steps, shadows, grads = [torch.tensor(0.0)], [torch.randn(7)], [torch.randn(7)]
    before = [t.clone() for t in params + exp_avg + exp_avg_sq + steps + shadows + grads]
    reference.adam_average_(
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        [],
        steps,
        shadows,
        torch.tensor(2.0**16),
        torch.tensor(1.0),
        0.1,
        0.9,
        0.999,
        1e-8,
        0.0,
        True,
        False,
        "ema",
        [0.9],
    )
    after = params + exp_avg + exp_avg_sq + steps + shadows + grads
    assert all(torch.equal(a, b) for a, b in zip(after, before))
