"""The registered ops themselves (torch.ops.belay_kernels.*): torch.library.opcheck for
every op, a torch.compile(fullgraph=True) training step, and clear refusals of bad input
when the ops are called directly, before any memory is written."""

import pytest
import torch
from _extension_cases import require_backend

from belay_kernels.testing import random_like_model

pytestmark = pytest.mark.usefixtures("cpp_backend")


@pytest.fixture(scope="module")
def cpp_backend():
    require_backend("cpp")


def _ops():
    from belay_kernels.extension._library import ops

    return ops()


def _pair(n, weights_dtype=torch.float32, shadow_dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        random_like_model(n, weights_dtype, generator=generator),
        random_like_model(n, shadow_dtype, generator=generator),
    )


def _samples():
    """(op name, args) covering each op, its number and tensor hyperparameters, and lists."""
    w, s = _pair(1009, torch.bfloat16, torch.float32)
    w2, s2 = _pair(31, torch.bfloat16, torch.float32, seed=1)
    counter = torch.zeros((), dtype=torch.int64)
    rate = torch.tensor([0.1], dtype=torch.float64)
    count = torch.tensor([2], dtype=torch.int64)
    yield "ema_update_", (s, w, 0.9, None, True, counter)
    yield "ema_update_", (s, w, 0.0, rate, False, None)
    yield "ema_update_foreach_", ([s, s2], [w, w2], 0.9, None, True, counter)
    yield "swa_update_", (s, w, 3, None, True, counter)
    yield "swa_update_", (s, w, 0, count, True, None)
    yield "swa_update_foreach_", ([s, s2], [w, w2], 1, None, False, None)
    yield "belay_step_", (w, s, 0.05, 0.6, None, None, True, counter)
    yield "belay_step_", (w, s, 0.0, 0.0, rate, rate, True, counter)
    yield "belay_step_foreach_", ([w, w2], [s, s2], 0.05, 0.6, None, None, True, None)
    yield "two_point_average_", (torch.empty_like(w), w, s)
    yield "two_point_average_foreach_", ([torch.empty_like(w), torch.empty_like(w2)], [w, w2], [s, s2])
    yield "swap_", (w, s, False)
    yield "swap_foreach_", ([w, w2], [s, s2], True)


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(_ops(), name).default, args)


def test_compiled_training_step_has_no_graph_break():
    """A model step, its optimizer step, and the averaging ops in one fullgraph compile."""
    ops = _ops()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shadows = [p.detach().clone() for p in model.parameters()]
    ema = [p.detach().clone() for p in model.parameters()]
    counter = torch.zeros((), dtype=torch.int64)

    def update():
        optimizer.step()
        with torch.no_grad():
            params = [p.detach() for p in model.parameters()]
            ops.ema_update_foreach_(ema, params, 0.9, None, True, counter)
            for p, s in zip(params, shadows):
                ops.belay_step_(p, s, 0.05, 0.6, None, None, True, counter)

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    eager_model = torch.nn.Linear(16, 4)
    eager_model.load_state_dict(model.state_dict())
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    eager_shadows = [s.clone() for s in shadows]
    eager_ema = [e.clone() for e in ema]
    for _ in range(3):
        x = torch.randn(8, 16)
        for m, opt in ((model, optimizer), (eager_model, eager_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
        compiled()
        eager_optimizer.step()
        with torch.no_grad():
            for p, s, e in zip(eager_model.parameters(), eager_shadows, eager_ema):
                torch.lerp(e, p.detach(), 0.1, out=e)
                w = p.detach().clone()
                p.detach().lerp_(s, 0.6)
                s.lerp_(w, 0.05)
    for got, want in zip([*model.parameters(), *shadows, *ema],
                         [*eager_model.parameters(), *eager_shadows, *eager_ema]):
        torch.testing.assert_close(got.detach(), want.detach())
    assert int(counter) == 0


# --- bad input on direct calls ---------------------------------------------------------

def _refuses(call, match, *untouched):
    before = [t.clone() for t in untouched]
    with pytest.raises(ValueError, match=match):
        call()
    for t, b in zip(untouched, before):
        assert torch.equal(t, b), "a refused call wrote memory"


def test_refuses_unsupported_dtypes():
    ops = _ops()
    w, s = _pair(10, torch.float64, torch.float32)
    _refuses(lambda: ops.ema_update_(s, w, 0.9, None, True, None), "no compiled kernel", s)
    ints = torch.arange(10)
    _refuses(lambda: ops.ema_update_(ints, ints.clone(), 0.9, None, True, None),
             "no compiled kernel", ints)
    w, s = _pair(10, torch.float16, torch.float32)
    _refuses(lambda: ops.swap_(w, s, False), "no exact in-place swap", w, s)
    out = torch.empty(10, dtype=torch.float32)
    _refuses(lambda: ops.two_point_average_(out, w, s), "out is Float", out)


def test_refuses_mismatched_sizes_and_layouts():
    ops = _ops()
    w, s = _pair(10)
    _refuses(lambda: ops.ema_update_(s[:9], w, 0.9, None, True, None), "9 elements", s)
    wide = torch.randn(10, 2)
    _refuses(lambda: ops.ema_update_(s, wide[:, 0], 0.9, None, True, None),
             "not contiguous", s)
    _refuses(lambda: ops.ema_update_(s.to_sparse(), w, 0.9, None, True, None), "layout", s)


def test_refuses_aliasing():
    ops = _ops()
    buffer = torch.randn(20)
    _refuses(lambda: ops.belay_step_(buffer[:10], buffer[5:15], 0.1, 0.1, None, None, True, None),
             "share memory", buffer)
    _refuses(lambda: ops.swap_(buffer, buffer, False), "share memory", buffer)


def test_refuses_bad_scalars_and_counter():
    ops = _ops()
    w, s = _pair(10)
    _refuses(lambda: ops.ema_update_(s, w, 1.5, None, True, None), r"decay must be in \[0, 1\]", s)
    _refuses(lambda: ops.belay_step_(w, s, 0.1, -0.1, None, None, True, None), "beta", w, s)
    _refuses(lambda: ops.swa_update_(s, w, -1, None, True, None), "count must be >= 0", s)
    _refuses(lambda: ops.ema_update_(s, w, 0.0, torch.tensor([0.9]), True, None), "float64", s)
    _refuses(lambda: ops.swa_update_(s, w, 0, torch.tensor([1.0]), True, None), "int64", s)
    bad_counter = torch.zeros(2, dtype=torch.int64)
    _refuses(lambda: ops.ema_update_(s, w, 0.9, None, True, bad_counter), "skipped", s)
    _refuses(lambda: ops.ema_update_(s, w, 0.9, None, True, torch.zeros((), dtype=torch.int32)),
             "skipped", s)


def test_refuses_bad_lists():
    ops = _ops()
    w, s = _pair(10)
    w2, s2 = _pair(5, torch.bfloat16, torch.bfloat16)
    _refuses(lambda: ops.ema_update_foreach_([s, s.clone()], [w], 0.9, None, True, None),
             "has 1 tensors", s)
    _refuses(lambda: ops.ema_update_foreach_([s, s2], [w, w2], 0.9, None, True, None),
             "one dtype per list", s, s2)
    _refuses(lambda: ops.ema_update_foreach_([s, s2], [w, w2[:4]], 0.9, None, True, None),
             r"weights\[1\] has 4 elements", s, s2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refuses_mixed_devices():
    ops = _ops()
    w, s = _pair(10)
    _refuses(lambda: ops.ema_update_(s.cuda(), w, 0.9, None, True, None), "move them", w)
