"""Static GPU check of the Triton kernels, no GPU needed: compile every kernel ahead of
time for sm_80 and sm_90 and read the PTX (see belay_kernels/backend/triton/aot.py)."""

import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the AOT check needs compiled (not interpreted) kernels", allow_module_level=True)

from belay_kernels.backend.triton import aot  # noqa: E402

CASES = aot.fast_cases() + aot.fast_cases(foreach=True) + aot.graph_cases()


def allowed_scalar_loads(case: aot.Case) -> int:
    """Per-program loads of one value a kernel may make: in the graph configuration each
    device-side scalar, the step and the skip flag; in the list kernels the table entries
    (block owner, size, first block, one offset per tensor column)."""
    loads = len(aot.scalar_pointers(case.kernel)) if case.graph else 0
    if case.foreach:
        columns = len(set(case.method.inputs) | set(case.method.outputs))
        loads += 3 + columns
    return loads


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_fast_path_moves_each_element_once_with_128_bit_accesses(case, arch):
    report = aot.analyse(case, arch)
    assert report.local_ops == 0, "ld.local/st.local in the PTX"
    assert report.usage["stack_bytes"] == 0 and report.usage["spill_bytes"] == 0, report.usage
    assert report.fast_stores and set(report.fast_stores) == {128}, report.fast_stores
    assert report.streaming_loads, report.fast_loads
    # one load of every input element and one store of every output element, no more
    assert report.load_bytes_per_element == case.bytes_per_element(case.method.inputs)
    assert report.store_bytes_per_element == case.bytes_per_element(case.method.outputs)
    assert report.scalar_loads <= allowed_scalar_loads(case), report.fast_loads


@pytest.mark.parametrize(
    "case",
    [c for c in aot.graph_cases() if c.method.name == "ema_update_"],
    ids=lambda c: c.label.replace(" ", "-"),
)
def test_warmup_weight_is_fp64_math(case):
    """The EMA warmup's weight: an IEEE fp64 division and fp64 exp2/log2, none of the
    approximate fp32 instructions (so a Warmup of gamma = power = 1 is the SWA's 1 / (k + 1))."""
    ptx = aot.compile_case(case, 90).asm["ptx"]
    assert "div.rn.f64" in ptx
    for approximate in (
        "ex2.approx.f32",
        "lg2.approx.f32",
        "div.full.f32",
        "rcp.approx.f32",
        "ex2.approx.ftz.f32",
        "lg2.approx.ftz.f32",
    ):
        assert approximate not in ptx, approximate


MULTI_CASES = (
    aot.multi_ema_cases() + aot.multi_ema_cases(foreach=True) + aot.multi_ema_graph_cases()
)


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_multi_ema_loads_the_weights_once_and_each_shadow_once(case, arch):
    """K shadows: the bytes of one weights load, K shadow loads and K shadow stores per
    element (K weights loads would add (K - 1) weights' bytes), all 128-bit, no spills."""
    k = case.method.profiles
    report = aot.analyse(case, arch)
    assert report.local_ops == 0, "ld.local/st.local in the PTX"
    assert report.usage["stack_bytes"] == 0 and report.usage["spill_bytes"] == 0, report.usage
    assert report.fast_stores and set(report.fast_stores) == {128}, report.fast_stores
    shadow, weights = case.role_dtype("shadow").itemsize, case.role_dtype("weights").itemsize
    assert report.load_bytes_per_element == weights + k * shadow
    assert report.store_bytes_per_element == k * shadow
    # (16 bytes per thread and tensor: each 128-bit access moves 16 // itemsize elements)
    per_thread = case.elements_per_thread
    assert len(report.fast_stores) == k * per_thread * shadow // 16
    assert len(report.streaming_loads) == (k * shadow + weights) * per_thread // 16
    # each device decay: one load in the full-block and one in the tail-block branch (only
    # one of which runs in a program)
    decay_loads = 2 * k if case.graph else 0
    table_loads = 3 + k + 1 if case.foreach else 0
    assert report.scalar_loads <= decay_loads + table_loads, report.fast_loads


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("case", aot.fused_cases(), ids=lambda c: c.label.replace(" ", "-"))
def test_fused_step_moves_each_element_once_with_128_bit_accesses(case, arch):
    """The optimizer's step and the average in one pass: one load of the param, the
    gradient, the optimizer's state and each shadow, one store of each (the gradient is
    stored too: it is unscaled in place), all 128-bit, no spills."""
    report = aot.analyse(case, arch)
    assert report.local_ops == 0, "ld.local/st.local in the PTX"
    assert report.usage["stack_bytes"] == 0 and report.usage["spill_bytes"] == 0, report.usage
    assert report.fast_stores and set(report.fast_stores) == {128}, report.fast_stores
    assert report.load_bytes_per_element == case.bytes_per_element(case.inputs)
    assert report.store_bytes_per_element == case.bytes_per_element(case.outputs)
    # the table's owner, size, first block and one offset per column; the step count's
    # offset and the count (Adam); found_inf and grad_scale
    columns = len(case.inputs)
    steps = 2 if case.optimizer == "adam" else 0
    assert report.scalar_loads <= 3 + columns + steps + 2, report.fast_loads


@pytest.mark.parametrize(
    "case",
    [c for c in aot.fused_cases() if c.optimizer == "adam" and c.average == "lerp"],
    ids=lambda c: c.label.replace(" ", "-"),
)
def test_adam_bias_corrections_are_fp64_math(case):
    """bc1, bc2, lr / bc1 and sqrt(bc2) from the device's step count: fp64 exp2 and an IEEE
    fp64 division and square root, none of the approximate fp32 instructions; the
    per-element divisions and square roots are the correctly rounded fp32 ones."""
    ptx = aot.compile_case(case, 90).asm["ptx"]
    for exact in ("div.rn.f64", "sqrt.rn.f64"):
        assert exact in ptx, exact
    for approximate in ("ex2.approx.f32", "lg2.approx.f32", "div.full.f32", "sqrt.approx"):
        assert approximate not in ptx, approximate
