"""Shared by the tests that run Triton's interpreter (TRITON_INTERPRET=1)."""

import numpy as np
import torch


def round_bf16_like_the_gpu():
    """Triton 3.8's interpreter converts fp32 to bf16 by truncation (1.999 -> 1.992),
    where the GPU's cvt.rn.bf16.f32 rounds to nearest even, as torch does. Compare the
    kernels, not that difference: make the interpreter's cast round as the GPU does."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl
    if getattr(original, "rounds_like_the_gpu", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_torch = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = as_torch.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.rounds_like_the_gpu = True
    builder.cast_impl = cast_impl
