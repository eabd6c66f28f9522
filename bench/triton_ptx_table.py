"""Print the static PTX check of every Triton kernel, and a roofline estimate.

Compiles each kernel ahead of time for sm_80 and sm_90 (no GPU needed), then prints a
markdown table: kernel, dtype pair, arch, fast-path vector width, local memory,
registers, and bytes moved per element as counted from the PTX's global loads and
stores (``multi_ema_update_xK``: K shadows of one weights tensor in one pass; the fused
optimizer steps as ``<optimizer>_average_ <average>x<shadows>``). Then the
estimated time per step at 90% of H100 HBM3 peak bandwidth.

    PYTHONPATH=. python bench/triton_ptx_table.py            # all kernels, both archs
    PYTHONPATH=. python bench/triton_ptx_table.py --quick    # flat kernels on sm_90 only
"""

from __future__ import annotations

import argparse
import sys

from belay_kernels.backend.triton import aot

H100_PEAK_BYTES_PER_S = 3.35e12  # HBM3, H100 SXM datasheet
ROOFLINE_FRACTION = 0.9
PARAMS = {"1B": 1e9, "7B": 7e9}


def ptx_rows(cases, archs):
    header = (
        "| kernel | dtype pair (weights/shadow) | arch | block | vector bits "
        "| local mem bytes (ld/st.local, stack, spill) | registers | smem ops | scalar loads "
        "| bytes/elem loaded | bytes/elem stored | bytes/elem total |"
    )
    yield header
    yield "|" + "---|" * (header.count("|") - 1)
    for case in cases:
        for arch in archs:
            r = aot.analyse(case, arch)
            name, variant, pair = case.label.split(" ")
            local = r.local_ops + r.usage["stack_bytes"] + r.usage["spill_bytes"]
            yield (
                f"| {name} {variant} | {pair} | sm_{arch} | {case.block} | {r.vector_bits} "
                f"| {local} | {r.usage['registers']} | {r.shared_ops} | {r.scalar_loads} | "
                f"{r.load_bytes_per_element:g} | {r.store_bytes_per_element:g} | "
                f"{r.load_bytes_per_element + r.store_bytes_per_element:g} |"
            )


def roofline_rows(cases):
    bandwidth = ROOFLINE_FRACTION * H100_PEAK_BYTES_PER_S
    yield (
        "| kernel | dtype pair | bytes/elem | "
        + " | ".join(f"est. ms/step, {k} params" for k in PARAMS)
        + " |"
    )
    yield "|---|---|---|" + "---|" * len(PARAMS)
    for case in cases:
        r = aot.analyse(case, 90)
        per_element = r.load_bytes_per_element + r.store_bytes_per_element
        times = " | ".join(f"{per_element * n / bandwidth * 1e3:.2f}" for n in PARAMS.values())
        name, variant, pair = case.label.split(" ")
        yield f"| {name} | {pair} | {per_element:g} | {times} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="flat kernels on sm_90 only")
    args = parser.parse_args(argv)
    cases = aot.fast_cases() + aot.multi_ema_cases()
    archs = (90,) if args.quick else aot.ARCHS
    all_cases = (
        cases
        if args.quick
        else (
            cases
            + aot.fast_cases(foreach=True)
            + aot.multi_ema_cases(foreach=True)
            + aot.graph_cases()
            + aot.multi_ema_graph_cases()
            + aot.fused_cases()
        )
    )
    print(
        f"Static PTX check: {aot.THREADS} threads per program, 2 x 128-bit accesses per "
        "thread for the widest tensor; fast path = unpredicated "
        "global accesses (full blocks).\n"
    )
    for row in ptx_rows(all_cases, archs):
        print(row, flush=True)
    print(
        f"\nRoofline ESTIMATE (not a measurement): bytes/elem from the sm_90 PTX above, "
        f"moved at {ROOFLINE_FRACTION:.0%} of H100 HBM3 peak "
        f"({H100_PEAK_BYTES_PER_S / 1e12:.2f} TB/s); one flat buffer per step.\n"
    )
    for row in roofline_rows(cases):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
