"""Per-element building blocks shared by every Triton kernel: offsets, masked or unmasked
loads and stores, lerp, the non-finite policy, scalars and the pointer table.

The math that two kernels share is written here once: ``_lerp`` is the reference's
two-sided ``torch.lerp`` formula, ``_keep_where_nonfinite`` is the reference's
skip-and-count policy. Every value is computed in ``COMPUTE`` (fp32, or fp64 when a
tensor is fp64) and cast back to each tensor's dtype on store.
"""

import triton
import triton.language as tl


@triton.jit
def _offsets(start, BLOCK: tl.constexpr):
    # ``start`` is int64, so offsets past 2**31 elements do not wrap.
    return start + tl.arange(0, BLOCK)


@triton.jit
def _load(ptr, offs, n, MASKED: tl.constexpr):
    # Full blocks load without a mask, so the 16-byte-aligned fast path vectorizes
    # whatever n is; only the last block of a tensor is masked.
    if MASKED:
        value = tl.load(ptr + offs, mask=offs < n, other=0)
    else:
        value = tl.load(ptr + offs)
    return value


@triton.jit
def _store(ptr, offs, value, n, MASKED: tl.constexpr):
    value = value.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < n)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _lerp(a, b, t):
    """torch.lerp: ``a + t (b - a)`` for |t| < 0.5, else ``b - (b - a)(1 - t)``; a weight
    of exactly 1 copies ``b`` even over a non-finite ``a``. The explicit fma pins the
    rounding to ATen's vectorized lerp (one rounding per branch)."""
    diff = b - a
    return tl.where(
        t == 1, b, tl.where(tl.abs(t) < 0.5, tl.fma(t, diff, a), tl.fma(t - 1, diff, b))
    )


@triton.jit
def _keep_where_nonfinite(new, old, incoming, skipped_ptr, HAS_SKIPPED: tl.constexpr):
    """``old`` where ``incoming`` is NaN/inf, else ``new``; adds the count to *skipped.
    Masked-off lanes were loaded as 0, so they never count."""
    bad = ~(tl.abs(incoming) < float("inf"))
    if HAS_SKIPPED:
        n_bad = tl.sum(bad.to(tl.int64), axis=0)
        # One atomic per block, and none at all in the normal case of no bad element.
        tl.atomic_add(skipped_ptr, n_bad, mask=n_bad > 0, sem="relaxed")
    return tl.where(bad, old, new)


@triton.jit
def _spring_and_follow(
    weights,
    followed,
    shadow,
    alpha,
    beta,
    skipped_ptr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
):
    """BELAY's element update: the spring ``lerp(weights, shadow, beta)`` and the shadow's
    EMA step toward ``followed``, ``lerp(shadow, followed, alpha)``, which keeps the old
    shadow where ``followed`` is non-finite. ``followed`` is the weights themselves in the
    post-step form, and the weights from before the optimizer's step in the poster's form
    (reference.belay_poster_)."""
    new_weights = _lerp(weights, shadow, beta)
    new_shadow = _lerp(shadow, followed, alpha)
    if SKIP_NONFINITE:
        new_shadow = _keep_where_nonfinite(new_shadow, shadow, followed, skipped_ptr, HAS_SKIPPED)
    return new_weights, new_shadow


@triton.jit
def _lerp_into(
    shadow_ptr,
    offs,
    n,
    weights,
    weight,
    skipped_ptr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """The EMA/SWA element update of one shadow from weights already loaded (in their
    storage dtype): ``shadow <- lerp(shadow, weights, weight)`` under the non-finite
    policy. One EMA and the K EMAs of multi_ema share it, so they round alike."""
    shadow = _load(shadow_ptr, offs, n, MASKED).to(COMPUTE)
    weights = weights.to(COMPUTE)
    new_shadow = _lerp(shadow, weights, weight)
    if SKIP_NONFINITE:
        new_shadow = _keep_where_nonfinite(new_shadow, shadow, weights, skipped_ptr, HAS_SKIPPED)
    _store(shadow_ptr, offs, new_shadow, n, MASKED)


@triton.jit
def _lerp_shadow_block(
    shadow_ptr,
    weights_ptr,
    start,
    n,
    weight,
    skipped_ptr,
    MASKED: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = _offsets(start, BLOCK)
    weights = _load(weights_ptr, offs, n, MASKED)
    _lerp_into(
        shadow_ptr,
        offs,
        n,
        weights,
        weight,
        skipped_ptr,
        MASKED,
        SKIP_NONFINITE,
        HAS_SKIPPED,
        COMPUTE,
    )


@triton.jit
def _lerp_shadow(
    shadow_ptr,
    weights_ptr,
    start,
    n,
    weight,
    skipped_ptr,
    SKIP_NONFINITE: tl.constexpr,
    HAS_SKIPPED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``shadow <- lerp(shadow, weights, weight)`` on the block at ``start``, under the
    non-finite policy: the update of EMA and of SWA, which differ only in ``weight``."""
    if start + BLOCK <= n:
        _lerp_shadow_block(
            shadow_ptr,
            weights_ptr,
            start,
            n,
            weight,
            skipped_ptr,
            False,
            SKIP_NONFINITE,
            HAS_SKIPPED,
            COMPUTE,
            BLOCK,
        )
    else:
        _lerp_shadow_block(
            shadow_ptr,
            weights_ptr,
            start,
            n,
            weight,
            skipped_ptr,
            True,
            SKIP_NONFINITE,
            HAS_SKIPPED,
            COMPUTE,
            BLOCK,
        )


@triton.jit
def _skip_block(start, n, skipped_ptr, HAS_SKIPPED: tl.constexpr, BLOCK: tl.constexpr):
    """The block of a call whose tensor hyperparameter is out of range: nothing is written,
    and every element of the block counts as skipped."""
    if HAS_SKIPPED:
        tl.atomic_add(skipped_ptr, tl.minimum(n - start, BLOCK).to(tl.int64), sem="relaxed")


@triton.jit
def _odd_words_bits(high, low):
    """The int64 float bits that _launch.odd_words split into two words."""
    high = (high.to(tl.int64) >> 1) & 0xFFFFFFFF
    low = (low.to(tl.int64) >> 1) & 0xFFFFFFFF
    return (high << 32) | low


@triton.jit
def _host_float(bits, COMPUTE: tl.constexpr):
    """A Python float passed as the int64 bit pattern of its float64 value (see
    _launch.float_bits), so fp64 kernels get the exact value and fp32 kernels get it
    rounded once, as torch does with a Python scalar."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _rate(bits, ptr, FROM_PTR: tl.constexpr, ONE_MINUS: tl.constexpr, COMPUTE: tl.constexpr):
    """A rate given on the host (already ``1 - x`` there when ONE_MINUS) or as a
    1-element device tensor read here, with ``1 - x`` taken in float64 as the reference
    does (reference.one_minus); and whether ``x`` is in [0, 1] (false for NaN; a host
    number was checked on the host)."""
    if FROM_PTR:
        raw = tl.load(ptr).to(tl.float64)
        valid = (raw >= 0) & (raw <= 1)
        if ONE_MINUS:
            raw = 1 - raw
        value = raw.to(COMPUTE)
    else:
        value = _host_float(bits, COMPUTE)
        valid = bits == bits
    return value, valid


# --- tensor lists --------------------------------------------------------------------
# The table built by _launch.PointerTable (int64): for each of C columns (shadow,
# weights, ...) the T tensors' element offsets from the column's base pointer (the table's
# own address, passed as one kernel argument per column so the pointers keep their dtype
# and the JIT's alignment facts), then the T sizes, then each tensor's first block, then
# for each row scalar (a one-element tensor per row: the optimizer's step counts) the T
# offsets of the pieces' row's element; plus, separately, every block's owner (int32).


@triton.jit
def _table_block(table_ptr, owner_ptr, num_tensors, NUM_COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, first element of this program's block, size of that tensor)."""
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(owner_ptr + pid).to(tl.int64)
    n = tl.load(table_ptr + NUM_COLUMNS * num_tensors + tensor)
    first_block = tl.load(table_ptr + (NUM_COLUMNS + 1) * num_tensors + tensor)
    return tensor, (pid - first_block) * BLOCK, n


@triton.jit
def _locate(
    table_ptr,
    owner_ptr,
    size,
    NUM_COLUMNS: tl.constexpr,
    IS_LIST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(tensor index, first element of this program's block, size of that tensor), for a
    flat launch (``size`` is the tensor's) or a list launch (``size`` is the table's)."""
    if IS_LIST:
        tensor, start, n = _table_block(table_ptr, owner_ptr, size, NUM_COLUMNS, BLOCK)
    else:
        tensor = 0
        start = tl.program_id(0).to(tl.int64) * BLOCK
        n = size
    return tensor, start, n


@triton.jit
def _column(
    table_ptr,
    ptr,
    column: tl.constexpr,
    tensor,
    num_tensors,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The pointer of a column's tensor: ``ptr`` itself in a flat launch."""
    if IS_LIST:
        ptr = _table_pointer(table_ptr, ptr, column, tensor, num_tensors, ALIGNED)
    return ptr


@triton.jit
def _place(
    table_ptr,
    owner_ptr,
    size,
    ptrs,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The prologue of every kernel: (first element of this program's block, size of its
    tensor, then the pointer of each of the columns ``ptrs`` to that tensor)."""
    tensor, start, n = _locate(table_ptr, owner_ptr, size, len(ptrs), IS_LIST, BLOCK)
    return (start, n) + _columns(table_ptr, ptrs, 0, tensor, size, IS_LIST, ALIGNED)


@triton.jit
def _columns(
    table_ptr,
    ptrs,
    FIRST: tl.constexpr,
    tensor,
    num_tensors,
    IS_LIST: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """_column for a tuple of pointers, the columns FIRST, FIRST + 1, ..."""
    out = ()
    for k in tl.static_range(len(ptrs)):
        out = out + (_column(table_ptr, ptrs[k], FIRST + k, tensor, num_tensors, IS_LIST, ALIGNED),)
    return out


@triton.jit
def _table_pointer(
    table_ptr, base_ptr, column: tl.constexpr, tensor, num_tensors, ALIGNED: tl.constexpr
):
    offset = tl.load(table_ptr + column * num_tensors + tensor)
    if ALIGNED:
        # The launcher put only 16-byte-aligned tensors in this table, and the base (the
        # table) is 16-byte aligned, so the offset is a multiple of 16 bytes; writing it
        # as one tells the compiler, which then emits 128-bit accesses as it does for
        # aligned flat tensors.
        VECTOR: tl.constexpr = 128 // base_ptr.dtype.element_ty.primitive_bitwidth
        offset = offset // VECTOR * VECTOR
    return base_ptr + offset


@triton.jit
def _row_scalar(
    table_ptr,
    ptr,
    index: tl.constexpr,
    tensor,
    num_tensors,
    NUM_COLUMNS: tl.constexpr,
    IS_LIST: tl.constexpr,
):
    """The pointer to the row scalar ``index`` of this program's tensor: ``ptr`` itself in
    a flat launch. Not rounded as ALIGNED rounds the columns: the scalar is one element
    whatever its address."""
    if IS_LIST:
        offset = tl.load(table_ptr + (NUM_COLUMNS + 2 + index) * num_tensors + tensor)
        ptr = ptr + offset
    return ptr
