"""The libraries people use today, each driven through its own public API.

Every peer is built over a module (in the size sweep, a module holding one flat
parameter; in the model-level mode, a real architecture). A peer that has no such
method has no entry here; a peer that cannot keep a shadow of the requested dtype
raises :class:`Unsupported` and its cell stays empty. Nothing here stands in for a
peer: each step is the call a user of that library makes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .flat_cases import DECAY, SWA_COUNT


class Unsupported(Exception):
    """This peer cannot run this method or dtype pair through its API."""


SHORT_DTYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def _short(dtype: torch.dtype) -> str:
    return SHORT_DTYPE.get(dtype, str(dtype).removeprefix("torch."))


def _require_dtype(name: str, tensors, shadow_dtype: torch.dtype) -> None:
    found = {t.dtype for t in tensors if t.is_floating_point()}
    if found != {shadow_dtype}:
        kept = "/".join(sorted(map(_short, found)))
        # these peers copy the model, so what they keep is the weights' dtype
        raise Unsupported(
            f"no {_short(shadow_dtype)} shadow for {kept} weights ({name} "
            "keeps the shadow in the weights' dtype)"
        )


def one_phrase(exc: Exception) -> str:
    """An exception's first line, shortened at a word: a table cell, not a traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) > 80:
        text = text[:80].rsplit(" ", 1)[0] + " ..."
    return text


def _float_params(model: nn.Module):
    return [p for p in model.parameters() if p.is_floating_point()]


# --- torch primitives --------------------------------------------------------------------


def _lerp_operands(name: str, method: str, model: nn.Module, shadow_dtype: torch.dtype):
    """(lerp weight, the model's tensors, fresh shadows) for EMA or SWA as a lerp."""
    weight = {"ema": 1 - DECAY, "swa": 1 / (SWA_COUNT + 1)}.get(method)
    if weight is None:
        raise Unsupported(f"{name} has no {method}")
    weights = _float_params(model)
    kinds = {p.dtype for p in weights}
    if kinds != {shadow_dtype}:  # torch's lerp_ takes its operands in one dtype
        kept = "/".join(sorted(map(_short, kinds)))
        raise Unsupported(
            f"no {_short(shadow_dtype)} shadow for {kept} weights (lerp_ needs one dtype)"
        )
    return weight, weights, [p.detach().to(shadow_dtype, copy=True) for p in weights]


def lerp_loop(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    """One ``lerp_`` per parameter tensor."""
    weight, weights, shadows = _lerp_operands("lerp_ loop", method, model, shadow_dtype)

    @torch.no_grad()
    def step():
        for shadow, w in zip(shadows, weights):
            shadow.lerp_(w, weight)

    return step


def foreach_lerp(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    """``torch._foreach_lerp_`` over all parameter tensors."""
    weight, weights, shadows = _lerp_operands("_foreach_lerp_", method, model, shadow_dtype)

    @torch.no_grad()
    def step():
        torch._foreach_lerp_(shadows, weights, weight)

    return step


# --- libraries ---------------------------------------------------------------------------


def timm_model_ema_v3(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    if method != "ema":
        raise Unsupported(f"ModelEmaV3 has no {method}")
    from timm.utils.model_ema import ModelEmaV3

    weights_dtype = _float_params(model)[0].dtype
    dtype = None if shadow_dtype == weights_dtype else shadow_dtype
    ema = ModelEmaV3(model, decay=DECAY, dtype=dtype, foreach=True)
    _require_dtype("timm ModelEmaV3", ema.module.parameters(), shadow_dtype)
    return lambda: ema.update(model)


def ema_pytorch_foreach(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    if method != "ema":
        raise Unsupported(f"ema-pytorch has no {method}")
    from ema_pytorch import EMA

    weights_dtype = _float_params(model)[0].dtype
    mixed = shadow_dtype != weights_dtype
    # The library's own way to keep a higher-precision shadow: hand it the EMA module
    # and let it cast the model's values on the fly.
    ema_model = copy.deepcopy(model).to(shadow_dtype) if mixed else None
    ema = EMA(
        model,
        ema_model=ema_model,
        beta=DECAY,
        update_after_step=0,
        update_every=1,
        use_foreach=True,
        coerce_dtype=mixed,
        include_online_model=False,
    )
    _require_dtype("ema-pytorch", ema.ema_model.parameters(), shadow_dtype)
    ema.update()  # the first update only copies the model into the shadow
    return ema.update


def torch_ema(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    _require_dtype("torch_ema", ema.shadow_params, shadow_dtype)
    if method == "ema":

        def step():
            ema.update()

    elif method == "swap":
        # what torch_ema does around an evaluation with the average: store the live
        # weights, copy the shadow in, and restore them afterwards
        def step():
            with ema.average_parameters():
                pass

    else:
        raise Unsupported(f"torch_ema has no {method}")
    step.model = model  # torch_ema holds only weak references to the parameters
    return step


def averaged_model(method: str, model: nn.Module, shadow_dtype: torch.dtype):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if method == "ema":
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    elif method == "swa":
        averaged = AveragedModel(model)
    else:
        raise Unsupported(f"AveragedModel has no {method}")
    _require_dtype("AveragedModel", averaged.module.parameters(), shadow_dtype)
    averaged.update_parameters(model)  # the first call only copies
    return lambda: averaged.update_parameters(model)


# name -> builder(method, model, shadow_dtype) -> step
PEERS = {
    "lerp_ loop": lerp_loop,
    "torch._foreach_lerp_": foreach_lerp,
    "timm ModelEmaV3": timm_model_ema_v3,
    "ema-pytorch (foreach)": ema_pytorch_foreach,
    "torch_ema": torch_ema,
    "AveragedModel": averaged_model,
}

# Which methods each peer's API has (the sweep skips the rest without building them).
PEER_METHODS = {
    "lerp_ loop": ("ema", "swa"),
    "torch._foreach_lerp_": ("ema", "swa"),
    "timm ModelEmaV3": ("ema",),
    "ema-pytorch (foreach)": ("ema",),
    "torch_ema": ("ema", "swap"),
    "AveragedModel": ("ema", "swa"),
}


class FlatModel(nn.Module):
    """A module with one flat parameter: the size sweep's "model" for the peers."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = nn.Parameter(weights, requires_grad=False)


def peer_step(peer: str, method: str, model: nn.Module, shadow_dtype: torch.dtype):
    """Build ``peer`` over ``model`` and return its step; raises Unsupported."""
    if method not in PEER_METHODS[peer]:
        raise Unsupported(f"{peer} has no {method}")
    try:
        step = PEERS[peer](method, model, shadow_dtype)
        step()
    except Unsupported:
        raise
    except ImportError as exc:
        raise Unsupported(f"not installed ({one_phrase(exc)})") from exc
    except Exception as exc:  # the peer itself refused this dtype pair
        raise Unsupported(f"failed: {one_phrase(exc)}") from exc
    return step
