"""Averagers and torch.compile: the same tensors under the same names, a compiled forward
that sees the swapped-in average without recompiling, and a compiled training step.

Compilations are counted with torch._dynamo's CompileCounterWithBackend over the
"aot_eager" backend (AOTAutograd's tracing without Inductor's code generation, which
would take minutes on a small CPU machine)."""

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

import belay_kernels as bk


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g) for _ in range(n)]


def counter():
    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend("aot_eager")


def train_step(forward, optimizer, averager, x):
    loss = forward(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    averager.step()


def test_an_averager_on_a_compiled_module_averages_the_same_tensors_by_their_own_names():
    eager, compiled_inner = net(), net()
    compiled = torch.compile(compiled_inner, backend=counter())
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    ema_eager, ema_compiled = bk.EMA(eager, decay=0.5), bk.EMA(compiled, decay=0.5)
    assert ema_compiled.names() == ema_eager.names() == [n for n, _ in eager.named_parameters()]
    assert set(ema_compiled.state_dict()["shadow"]) == set(eager.state_dict())
    # The averager holds the compiled module's own Parameters (no copies of them).
    shadowed = {id(t) for track in ema_compiled._tracks for t in track.live}
    assert shadowed == {id(p) for p in compiled_inner.parameters()}

    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    for x in data(5):
        train_step(eager, opt_e, ema_eager, x)
        train_step(compiled, opt_c, ema_compiled, x)
    for a, b in zip(ema_eager.shadow_params(), ema_compiled.shadow_params()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    target = torch.compile(net(5), backend="eager")  # copy_to a compiled target by name
    ema_compiled.copy_to(target)
    for name, value in zip(ema_compiled.names(), ema_compiled.shadow_params()):
        assert torch.equal(target.get_parameter("_orig_mod." + name), value)


def test_a_compiled_forward_inside_averaged_returns_the_average_without_recompiling():
    model = net()
    count = counter()
    compiled = torch.compile(model, backend=count)
    ema = bk.EMA(compiled, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = torch.randn(6, 8)
    frames_after_first_round = None
    for i, x in enumerate(data(4)):
        train_step(compiled, opt, ema, x)
        twin = copy.deepcopy(model)
        ema.copy_to(twin)  # the average, evaluated eagerly on a separate model
        model.eval()
        with torch.no_grad():
            live_out = compiled(probe)
            with ema.averaged():
                averaged_out = compiled(probe)
            assert torch.equal(compiled(probe), live_out)  # the live weights are back
            torch.testing.assert_close(averaged_out, twin(probe), rtol=1e-6, atol=1e-7)
            assert not torch.allclose(averaged_out, live_out)
        model.train()
        if i == 0:
            frames_after_first_round = count.frame_count  # train graph + eval graph
    assert frames_after_first_round == 2
    assert count.frame_count == frames_after_first_round  # swapping never recompiled


def test_a_compiled_training_step_ending_in_step_compiles_once_and_matches_eager():
    """Without fullgraph: Dynamo breaks the graph around backward(), optimizer.step() (torch
    inserts those breaks itself) and averager.step(), and runs the latter eagerly."""
    eager, inner = net(), net()
    opt_e, opt_c = (torch.optim.AdamW(m.parameters(), lr=0.01) for m in (eager, inner))
    ema_e, ema_c = bk.EMA(eager, decay=0.7), bk.EMA(inner, decay=0.7)
    count = counter()
    compiled_step = torch.compile(train_step, backend=count)
    frames = []
    for x in data(6):
        train_step(eager, opt_e, ema_e, x)
        compiled_step(inner, opt_c, ema_c, x)
        frames.append(count.frame_count)
    assert frames[0] > 0 and frames[-1] == frames[1]  # compiled in the first steps, not per step
    assert ema_c.num_steps == 6
    for a, b in zip(ema_e.shadow_params(), ema_c.shadow_params()):  # AdamW traced rounds apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_averager_step_is_not_one_fullgraph():
    """The README's reason: step() checks, by data pointer, that the model's tensors still
    live in its flat buffers, and Dynamo cannot trace data_ptr()."""
    ema = bk.EMA(net(), decay=0.5)
    counter()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(ema.step, fullgraph=True, backend="eager")()
