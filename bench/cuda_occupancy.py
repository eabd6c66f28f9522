"""Registers per CUDA kernel (``ptxas -v``) and the occupancy each launch gets from them,
for csrc/cuda_kernels.cu, statically: no GPU needed.

    CUDA_HOME=/usr/local/cuda-13.0 python bench/cuda_occupancy.py --arch 80 90 [--markdown]

Occupancy is what cudaOccupancyMaxActiveBlocksPerMultiprocessor (which sizes the
launches) computes from the same numbers: blocks of 256 threads per SM, limited by
registers (64K per SM, allocated per warp in units of 256, i.e. per-thread counts
rounded up to 8), by 2048 threads per SM and by 32 blocks per SM (sm_80 and sm_90 alike;
the kernels use no shared memory).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda_kernels.cu"
BLOCK_THREADS = 256
LIMITS = {"registers": 65536, "threads": 2048, "blocks": 32}  # per SM, sm_80 and sm_90


def ptxas_report(arch: int) -> str:
    from torch.utils.cpp_extension import include_paths

    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            str(home / "bin" / "nvcc"),
            "-cubin",
            f"-arch=sm_{arch}",
            "-std=c++20",
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xptxas",
            "-v",
            "-o",
            f"{tmp}/k.cubin",
            str(SOURCE),
            *(f"-I{p}" for p in include_paths("cuda")),
            f"-I{home / 'include'}",
        ]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def kernels(report: str) -> list[tuple[str, int, int]]:
    """(readable kernel name, registers, spill bytes) per entry function."""
    rows = []
    pattern = (
        r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes "
        r"spill loads\s*\nptxas info\s*: Used (\d+) registers"
    )
    for mangled, stores, loads, registers in re.findall(pattern, report, re.S):
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout
        name = re.sub(r"belay::(\(anonymous namespace\)::)?|c10::|\(.*\)$|^void ", "", name.strip())
        rows.append((name.replace(" >", ">"), int(registers), int(stores) + int(loads)))
    return rows


def blocks_per_sm(registers: int) -> int:
    per_block = -(-registers // 8) * 8 * BLOCK_THREADS
    return min(
        LIMITS["registers"] // per_block, LIMITS["threads"] // BLOCK_THREADS, LIMITS["blocks"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    table: dict[str, dict[int, tuple[int, int]]] = {}
    for arch in args.arch:
        for name, registers, spills in kernels(ptxas_report(arch)):
            table.setdefault(name, {})[arch] = (registers, spills)
    head = ["kernel"] + [f"sm_{a}: registers / blocks per SM / occupancy" for a in args.arch]
    print("| " + " | ".join(head) + " |" if args.markdown else "\t".join(head))
    if args.markdown:
        print("|" + "---|" * len(head))
    for name in sorted(table):
        cells = [name]
        for arch in args.arch:
            registers, spills = table[name].get(arch, (0, 0))
            blocks = blocks_per_sm(registers)
            spill = f", {spills} B spilled" if spills else ""
            cells.append(f"{registers} / {blocks} / {blocks * BLOCK_THREADS / 2048:.0%}{spill}")
        print("| " + " | ".join(cells) + " |" if args.markdown else "\t".join(cells))


if __name__ == "__main__":
    main()
