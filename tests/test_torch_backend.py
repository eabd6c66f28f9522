"""The ``torch`` backend (belay_kernels/backend/torch.py) against the ``reference`` backend,
bit for bit: every op of the method table, flat tensors and lists, every dtype pair, sizes
that cross many chunk boundaries, several steps, both non-finite policies, hyperparameters
as numbers and as tensors (in and out of range, and weights that round to 1), on shadows
that already hold NaN, infinities and negative zeros. The chunk is shrunk so that small
tensors cross many chunks; tests/test_fingerprints.py covers the real chunk size."""

import pytest
import torch
from _extension_cases import one_cpu_thread  # noqa: F401 (fixture)

from belay_kernels import _backends, ops, reference
from belay_kernels.backend import torch as torch_backend
from belay_kernels.methods import DTYPE_PAIRS, METHODS
from belay_kernels.reference import swap_supported
from belay_kernels.testing import random_like_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CHUNK = 256
STEPS = 4
LAYOUTS = {"flat": [3 * CHUNK + 5], "list": [1009, 0, 3, 2 * CHUNK, 31]}
SPECIALS = (float("nan"), float("inf"), -float("inf"), -0.0)
# per scalar kind: the value at each step (rates on both sides of lerp's 0.5 switch)
VALUES = {
    "number": {"rate": (0.9, 0.3, 0.6, 0.05), "count": (0, 1, 2, 7)},
    "one": {"rate": (0.0, 1.0, 0.0, 1.0), "count": (0, 0, 0, 0)},  # decay 0 / beta 1 copy
    "bad": {"rate": (float("nan"),) * 4, "count": (-1,) * 4},
}
VARIANTS = {  # name: (values, as tensors, non-finite policy)
    "number": ("number", False, "skip"),
    "propagate": ("number", False, "propagate"),
    "tensor": ("number", True, "skip"),
    "copy": ("one", False, "skip"),
    "bad-tensor": ("bad", True, "skip"),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(torch_backend, "CPU_CHUNK", CHUNK)


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _fresh(sizes, dtype, gen, poison_every=0):
    out = []
    for n in sizes:
        t = random_like_model(n, dtype, generator=gen)
        if poison_every and n:
            hits = torch.randint(0, n, (max(1, n // poison_every),), generator=gen)
            for value, where in zip(SPECIALS, hits.chunk(len(SPECIALS))):
                t[where] = value
        out.append(t)
    return out


def _scalars(method, variant, step):
    values, as_tensor, _ = VARIANTS[variant]
    out = {}
    for s in method.scalars:
        if s.kind == "flag":
            out[s.name] = step % 2 == 1  # swap in, then back
            continue
        value = VALUES[values][s.kind][step]
        if as_tensor:
            value = torch.tensor(value, dtype=torch.int64 if s.kind == "count" else torch.float64)
        out[s.name] = value
    return out


def _call(method, args, scalars, policy, skipped, backend):
    fn = getattr(ops, "two_point_average" if method.name == "two_point" else method.op)
    if method.name == "two_point":
        out, weights, snapshot = args
        return fn(weights, snapshot, out=out, backend=backend)
    extra = {"nonfinite": policy, "skipped": skipped} if method.counts_skipped else {}
    return fn(*args, **scalars, **extra, backend=backend)


def run(method, backend, pair, sizes, variant, seed=0):
    """Every tensor the method wrote over STEPS steps, and the skipped counter."""
    gen = torch.Generator().manual_seed(seed)
    policy = VARIANTS[variant][2]
    state = {
        role: _fresh(sizes, method.dtype_of(role, *pair), gen, poison_every=41)
        for role in method.tensors
    }
    skipped = torch.zeros((), dtype=torch.int64)
    written = []
    for step in range(STEPS):
        for role in method.tensors:
            if role not in method.written:  # fresh inputs, a few non-finite at one step
                state[role] = _fresh(
                    sizes, method.dtype_of(role, *pair), gen, poison_every=300 if step == 1 else 0
                )
        args = [state[r][0] if len(sizes) == 1 else state[r] for r in method.tensors]
        _call(method, args, _scalars(method, variant, step), policy, skipped, backend)
        written += [t.clone() for r in method.written for t in state[r]]
    return written, skipped


def _variants(method):
    if not any(s.kind in ("rate", "count") for s in method.scalars):
        return ["number"]
    return [v for v in VARIANTS if method.counts_skipped or VARIANTS[v][2] == "skip"]


CASES = [
    pytest.param(
        m,
        pair,
        layout,
        variant,
        id=f"{m.name}-{'/'.join(str(d)[6:] for d in pair)}-{layout}-{variant}",
    )
    for m in METHODS
    for pair in DTYPE_PAIRS
    if m.name != "swap" or swap_supported(*pair)
    for layout in LAYOUTS
    for variant in _variants(m)
]


@pytest.mark.parametrize("method,pair,layout,variant", CASES)
def test_same_bits_as_the_reference(method, pair, layout, variant):
    got, got_skipped = run(method, "torch", pair, LAYOUTS[layout], variant)
    want, want_skipped = run(method, "reference", pair, LAYOUTS[layout], variant)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        differ = (_bits(g) != _bits(w)).nonzero().flatten()
        assert differ.numel() == 0, (
            f"written tensor {i}: {differ.numel()} of {g.numel()} elements differ, "
            f"first at {differ[:5].tolist()}: {g[differ[:5]].tolist()} vs {w[differ[:5]].tolist()}"
        )
    assert int(got_skipped) == int(want_skipped)


def test_non_contiguous_tensors_run_the_reference_whole():
    gen = torch.Generator().manual_seed(1)
    shadow = random_like_model(2 * 1009, torch.float32, generator=gen).view(1009, 2)[:, 0]
    weights = random_like_model(1009, torch.float32, generator=gen)
    expected = shadow.clone()
    ops.ema_update_(shadow, weights, decay=0.9, backend="torch")
    ops.ema_update_(expected, weights, decay=0.9, backend="reference")
    assert torch.equal(_bits(shadow), _bits(expected))


def test_the_chunk_loop_gives_the_thread_count_back():
    gen = torch.Generator().manual_seed(2)
    w, s = (random_like_model(10 * CHUNK, torch.float32, generator=gen) for _ in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ops.belay_step_(w, s, alpha=0.1, beta=0.2, backend="torch")  # chunked
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_torch_is_the_fast_path_and_auto_never_takes_the_reference():
    fp32 = (torch.float32,) * 2
    assert _backends.resolve("torch", "ema_update_", "cpu", fp32, True) is torch_backend
    for device_type in ("cpu", "cuda", "mps", "xpu"):
        for contiguous in (True, False):
            module = _backends.resolve("auto", "ema_update_", device_type, fp32, contiguous)
            assert module.__name__ != "belay_kernels.reference"


# --- K EMAs of one weights tensor (the post-hoc EMA's op) -------------------------------

MULTI_DECAYS = {  # per step, K decays taken cyclically; decay 0 copies, 1 keeps
    "number": ((0.9, 0.3, 0.999, 0.05, 0.6), (0.0, 1.0, 0.7, 0.2, 0.5)),
    "tensor": ((0.9, 0.3, 0.999, 0.05, 0.6), (0.0, float("nan"), 1.5, -0.25, 1.0)),
}
MULTI_SIZES = {
    "flat": [3 * CHUNK + 5],
    "tiny": [1],
    "empty": [0],
    "list": [1009, 0, 3, 2 * CHUNK, 31],
}


def _multi_decays(kind, k, step):
    values = MULTI_DECAYS[kind][step % 2]
    decays = [values[(i + step) % len(values)] for i in range(k)]
    if kind == "tensor":
        return [torch.tensor(d, dtype=torch.float64) for d in decays]
    return decays


def _run_multi(k, pair, sizes, kind, policy, fused, seed=0):
    """Every shadow after each of STEPS steps, and the skipped counter: K profiles by
    ``torch_backend.multi_ema_update_(_foreach_)`` when ``fused``, else K reference calls."""
    gen = torch.Generator().manual_seed(seed)
    weights_dtype, shadow_dtype = pair
    shadows = [_fresh(sizes, shadow_dtype, gen, poison_every=41) for _ in range(k)]
    skipped = torch.zeros((), dtype=torch.int64)
    skip = policy == "skip"
    written = []
    for step in range(STEPS):
        weights = _fresh(sizes, weights_dtype, gen, poison_every=300 if step == 1 else 0)
        decays = _multi_decays(kind, k, step)
        if not fused:
            for profile, decay in zip(shadows, decays):
                for s, w in zip(profile, weights):
                    reference.ema_update_(s, w, decay, skip, skipped)
        elif len(sizes) == 1:
            torch_backend.multi_ema_update_(
                [p[0] for p in shadows], weights[0], decays, skip, skipped
            )
        else:
            torch_backend.multi_ema_update_foreach_(shadows, weights, decays, skip, skipped)
        written += [t.clone() for profile in shadows for t in profile]
    return written, skipped


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: "/".join(str(d)[6:] for d in p))
@pytest.mark.parametrize("layout", list(MULTI_SIZES))
@pytest.mark.parametrize(
    "kind,policy", [("number", "skip"), ("number", "propagate"), ("tensor", "skip")]
)
def test_multi_ema_is_k_reference_emas_bit_for_bit(k, pair, layout, kind, policy):
    got, got_skipped = _run_multi(k, pair, MULTI_SIZES[layout], kind, policy, fused=True)
    want, want_skipped = _run_multi(k, pair, MULTI_SIZES[layout], kind, policy, fused=False)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        differ = (_bits(g) != _bits(w)).nonzero().flatten()
        assert differ.numel() == 0, (
            f"shadow {i}: {differ.numel()} of {g.numel()} elements differ, first at "
            f"{differ[:5].tolist()}: {g[differ[:5]].tolist()} vs {w[differ[:5]].tolist()}"
        )
    assert int(got_skipped) == int(want_skipped)
    if sum(MULTI_SIZES[layout]) > 1 and (policy == "skip" or kind == "tensor"):
        assert int(got_skipped) > 0  # the injected non-finite weights (or bad decays) counted


def test_multi_ema_reads_each_weights_chunk_once_for_all_profiles(monkeypatch):
    """The weights are upcast (bf16 -> fp32 shadows) once per chunk, not once per profile."""
    gen = torch.Generator().manual_seed(3)
    weights = random_like_model(4 * CHUNK, torch.bfloat16, generator=gen)
    shadows = [random_like_model(4 * CHUNK, torch.float32, generator=gen) for _ in range(3)]
    upcasts = []
    real_up = reference._up
    monkeypatch.setattr(reference, "_up", lambda t, d: upcasts.append(t.dtype) or real_up(t, d))
    torch_backend.multi_ema_update_(shadows, weights, [0.9, 0.99, 0.999], True, None)
    assert upcasts.count(torch.bfloat16) == 4  # one per chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_weights_whose_sum_overflows_still_match(dtype):
    """The finiteness pre-check may say "maybe not finite" for huge finite weights (their
    sum overflows); the skip path taken then must still give the reference's bits."""
    gen = torch.Generator().manual_seed(4)
    big = torch.finfo(dtype).max / 2
    weights = (random_like_model(5 * CHUNK + 1, torch.float64, generator=gen).sign() * big).to(
        dtype
    )
    weights[::2] = big  # more positive than negative: the sum overflows
    shadow = random_like_model(5 * CHUNK + 1, dtype, generator=gen)
    expected, got = shadow.clone(), shadow.clone()
    counted = [torch.zeros((), dtype=torch.int64) for _ in range(2)]
    reference.ema_update_(expected, weights, 0.7, True, counted[0])
    torch_backend.ema_update_(got, weights, 0.7, True, counted[1])
    assert torch.equal(_bits(got), _bits(expected))
    assert int(counted[1]) == int(counted[0]) == 0
