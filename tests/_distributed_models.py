"""The small model, data and float64 oracles the distributed tests share.

``Tiny`` has what FSDP2 makes interesting: dimensions that do not divide by 2 or 4 (so
shards are uneven, and at 4 ranks one of ``gain``'s is empty), an embedding tied to the output head, a
frozen layer, a floating buffer that changes every forward and an integer buffer.
"""

from __future__ import annotations

import torch
from torch import nn

import belay_kernels as bk

STEPS = 50

# name -> (class, settings); the kind of tensor state each one saves
AVERAGERS = {
    "ema": (bk.EMA, {"decay": 0.9}),
    "swa": (bk.SWA, {"start": 3}),
    "belay": (bk.Belay, {"alpha": 0.1, "beta": 0.05}),
    "two_point": (bk.TwoPoint, {"gap": 4}),
}
KIND = {"ema": "shadow", "swa": "shadow", "belay": "shadow", "two_point": "snapshot"}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 33), nn.LayerNorm(33), nn.GELU(), nn.Linear(33, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.gain = nn.Parameter(torch.ones(5))  # 5 rows: 3+2 on 2 ranks, 2+2+1+0 on 4
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.body(x) + self.frozen(x)
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1 * x.detach().float().pow(2).mean((0, 1)))
                self.calls += 1
        return self.head(x * self.scale.to(x.dtype) * self.gain.mean())


def tiny(seed=0, shard=False, mp_policy=None) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = mp_policy or MixedPrecisionPolicy()
        fully_shard(model.body, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g)


def train_step(model, optimizer, step: int) -> None:
    """One step on the same batch on every rank, so the sharded run's gradients equal a
    single process's exactly (FSDP2 averages identical gradients)."""
    tokens, target = batch(step)
    loss = nn.functional.cross_entropy(model(tokens).float().flatten(0, 1), target.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def named_local(model) -> dict[str, torch.Tensor]:
    return {n: local(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


class Oracle:
    """Each averager's recurrence in float64 on the tensors it is shown, never rounded."""

    def __init__(self, key, settings, names, initial, buffer_names):
        self.key, self.settings = key, settings
        self.names, self.buffers = names, set(buffer_names)
        self.state = {n: initial[n].double().clone() for n in names}
        self.updates = 0

    def step(self, t: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Update from the weights after the optimizer's step; returns what BELAY leaves
        in the weights (empty for the others)."""
        w = {n: weights[n].double() for n in self.names}
        pulled = {}
        if self.key == "ema":
            d = self.settings["decay"]
            self.state = {n: s + (1 - d) * (w[n] - s) for n, s in self.state.items()}
        elif self.key == "swa":
            if t >= self.settings["start"]:
                k = self.updates
                self.state = {
                    n: w[n].clone() if k == 0 else s + (w[n] - s) / (k + 1)
                    for n, s in self.state.items()
                }
                self.updates += 1
        elif self.key == "belay":
            a, b = self.settings["alpha"], self.settings["beta"]
            pulled = {
                n: w[n] + b * (s - w[n]) for n, s in self.state.items() if n not in self.buffers
            }
            self.state = {n: s + a * (w[n] - s) for n, s in self.state.items()}
        elif (t + 1) % self.settings["gap"] == 0:  # two_point: the snapshot is retaken
            self.state = {n: w[n].clone() for n in self.names}
        return pulled


def check_shadow_params_like_the_parameters(averager, model, kind: str, what: str) -> None:
    """``shadow_params()`` under sharding: each sharded tensor's shadow is a DTensor over
    the averager's own local view (no copy), with its parameter's global shape and the
    placements state_dict() saves, so ``full_tensor()`` gathers what state_dict() holds;
    a tensor that is not sharded (a buffer) keeps a plain shadow."""
    from belay_kernels import distributed as bkd

    whole = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    saved = averager.state_dict()[kind]
    sharded = 0
    for n, shadow, view in zip(
        averager.names(), averager.shadow_params(), averager._local_shadow_views()
    ):
        if not bkd.is_dtensor(saved[n]):
            assert not bkd.is_dtensor(shadow) and shadow.data_ptr() == view.data_ptr(), n
            continue
        sharded += 1
        assert bkd.is_dtensor(shadow), f"{what}: {n}'s shadow is a {type(shadow).__name__}"
        assert shadow.shape == whole[n].shape == saved[n].shape, f"{what}: {n} shape"
        assert shadow.stride() == saved[n].stride(), f"{what}: {n} stride"
        assert shadow.placements == saved[n].placements, f"{what}: {n} placements"
        assert shadow.to_local().data_ptr() == view.data_ptr(), f"{what}: {n} was copied"
        assert torch.equal(shadow.full_tensor(), saved[n].full_tensor()), f"{what}: {n} gathered"
    assert sharded, f"{what}: nothing is sharded"


def check_bad_state_refused_untouched(averager, kind: str, what: str) -> None:
    """A sharded averager refuses a bad state on every rank before writing anything: a
    negative counter, and a tensor of another shape."""
    import pytest

    import belay_kernels as bk

    for field, corrupt in (
        ("num_updates", lambda s: s.__setitem__("num_updates", -1)),
        ("saved shape", lambda s: s[kind].__setitem__(next(iter(s[kind])), torch.ones(3))),
    ):
        state = averager.state_dict()
        corrupt(state)
        before = [local(s).clone() for s in averager.shadow_params()]
        counters = (averager.num_steps, averager.num_updates, averager.num_skipped)
        with pytest.raises(bk.BelayInputError, match=field):
            averager.load_state_dict(state)
        assert all(torch.equal(a, local(b)) for a, b in zip(before, averager.shadow_params()))
        assert counters == (averager.num_steps, averager.num_updates, averager.num_skipped), what
