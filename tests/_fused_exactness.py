"""Where the compiled fused optimizer kernels give torch's own bits, in this process.

The kernels round as ATen's vector kernels do on a CPU with AVX2 or AVX-512. Three things
make torch's own CPU step differ from that:
- ATen's lerp must be the fused one (``lerp_rounding() == "fused"``, as for every op);
- torch's float32/float64 ``sqrt`` must be correctly rounded. Where ATen calls MKL's vector
  sqrt (an AMD CPU, for one: up to 0.75 ulp, a fifth of the roots one ulp off), the
  kernels' IEEE sqrt makes Adam's denominators differ by an ulp;
- bf16/fp16 ``x.add(y, alpha=a)`` (SGD's every step, Adam's coupled weight decay): ATen's
  vector loop rounds alpha to the 16-bit dtype, as the kernels do, but its ragged tail (the
  last numel % 32 elements) rounds otherwise, a 16-bit ulp now and then.
Where one of them does not hold, the tests compare within a stated bound instead.
"""

import math

import torch
from _fingerprints import lerp_rounding

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
REFERENCE_FUSED = lerp_rounding() == "fused"


def _sqrt_correctly_rounded() -> bool:
    """Whether torch's float32 and float64 sqrt round correctly in this process (the float32
    root of a float64 sqrt is correctly rounded: 53 >= 2 * 24 + 2 bits)."""
    x = torch.rand(4099, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    singles = torch.equal(x.float().sqrt(), x.float().double().sqrt().float())
    doubles = all(a == math.sqrt(b) for a, b in zip(x.sqrt().tolist(), x.tolist()))
    return singles and doubles


SQRT_EXACT = _sqrt_correctly_rounded()


def compiled_is_exact(optimizer: str, dtype: torch.dtype, coupled_decay: bool) -> bool:
    """Whether the compiled kernels give torch's bits for ``optimizer`` ("adam" or "sgd")
    on ``dtype`` parameters; ``coupled_decay``: Adam with a nonzero non-decoupled weight
    decay (its ``grad.add(param, alpha=wd)``)."""
    if not REFERENCE_FUSED:
        return False
    if optimizer == "adam" and dtype not in SIXTEEN_BIT and not SQRT_EXACT:
        return False
    adds_with_alpha = optimizer == "sgd" or coupled_decay
    return not (dtype in SIXTEEN_BIT and adds_with_alpha)
