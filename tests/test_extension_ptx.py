"""Static GPU check, no GPU needed: compile csrc/cuda_kernels.cu for sm_90 with nvcc and
read the compiler's own output. ptxas must report 0 bytes of spill stores and loads for
every kernel, and the PTX of the fp32 and bf16 fast paths must move memory with 128-bit
(.v4) global loads and stores. Skipped, with the reason, where nvcc is absent."""

import functools
import re
import subprocess
from pathlib import Path

import pytest

from belay_kernels._toolkit import find_toolkit

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda_kernels.cu"


def _cuda_home():
    """The toolkit root, found as setup.py finds it (a wrapper nvcc on PATH is followed)."""
    root = find_toolkit().root
    return Path(root) if root else None


@functools.cache
def _compile(tmp_dir: str):
    """(ptxas report, {demangled kernel name: PTX body}) for sm_90."""
    home = _cuda_home()
    if home is None:
        pytest.skip(find_toolkit().describe())
    from torch.utils.cpp_extension import include_paths

    command = [
        str(home / "bin" / "nvcc"),
        "-cubin",
        "-arch=sm_90",
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        "-Xptxas",
        "-v",
        "--keep",
        "--keep-dir",
        tmp_dir,
        "-o",
        str(Path(tmp_dir) / "kernels.cubin"),
        str(SOURCE),
        *(f"-I{p}" for p in include_paths("cuda")),
        f"-I{home / 'include'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    (ptx_file,) = Path(tmp_dir).glob("*.ptx")
    return result.stderr, _kernels(ptx_file.read_text())


def _kernels(ptx: str) -> dict[str, str]:
    bodies = {}
    for match in re.finditer(r"\.entry\s+(\w+)\((.*?)\n\}", ptx, re.S):
        name = subprocess.run(["c++filt", match.group(1)], capture_output=True, text=True)
        bodies[name.stdout.strip() or match.group(1)] = match.group(2)
    return bodies


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(str(tmp_path_factory.mktemp("ptx")))


def test_no_register_spills(compiled):
    report, kernels = compiled
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) >= len(kernels) > 0, report[-2000:]
    assert all(stores == "0" and loads == "0" for stores, loads in spills), report


# The fp32 and bf16 fast paths: every element functor compiled for these (weights, shadow)
# pairs, as their demangled names read, found in the PTX (so a new op is covered).
FAST_PAIRS = ["float, float", "c10::BFloat16, c10::BFloat16", "c10::BFloat16, float"]
_FUNCTOR = re.compile(r"flat_kernel<belay::(\w+)<([^<>]*)>\s*>")


def fast_paths(kernels, pair: str) -> list[str]:
    functors = set()
    for name in kernels:
        match = _FUNCTOR.search(name)
        if match and (match.group(2) == pair or match.group(2).startswith(pair + ", ")):
            functors.add(f"{match.group(1)}<{match.group(2)}>")
    return sorted(functors)


@pytest.mark.parametrize("kernel", ["flat_kernel", "list_kernel"])
@pytest.mark.parametrize("pair", FAST_PAIRS, ids=lambda p: p.replace("c10::", ""))
def test_fast_paths_use_128_bit_accesses(compiled, kernel, pair):
    _, kernels = compiled
    functors = fast_paths(kernels, pair)
    # every table op but the swap (integer bits), the multi-EMA for each K
    assert len({f.split("<")[0] for f in functors}) >= 4, functors
    for op in functors:
        (body,) = [b for name, b in kernels.items() if kernel in name and op in name]
        assert re.search(r"ld\.global(\.\w+)*\.v4\.", body), f"{op}: no 128-bit global load"
        assert re.search(r"st\.global(\.\w+)*\.v4\.", body), f"{op}: no 128-bit global store"


# The lerping ops: on the device too, a weight of exactly 1 copies (a compare with 1.0,
# 0f3F800000 in PTX, then a select), so a non-finite shadow is overwritten.
LERPING = [
    "ShadowUpdateOp<float, float, belay::EmaRule>",
    "ShadowUpdateOp<c10::BFloat16, c10::BFloat16, belay::EmaRule>",
    "ShadowUpdateOp<c10::BFloat16, float, belay::EmaRule>",
    "ShadowUpdateOp<float, float, belay::SwaRule>",
    "ShadowUpdateOp<c10::BFloat16, float, belay::SwaRule>",
    "BelayOp<float, float>",
    "BelayOp<c10::BFloat16, c10::BFloat16>",
    "BelayOp<c10::BFloat16, float>",
]


@pytest.mark.parametrize("op", LERPING, ids=lambda v: v.replace("c10::", "").replace("belay::", ""))
def test_a_weight_of_one_copies_on_the_device(compiled, op):
    _, kernels = compiled
    (body,) = [b for name, b in kernels.items() if "flat_kernel" in name and op in name]
    compares_with_one = re.findall(r"setp\.(?:eq|neu)\.f32\s+%p\d+, %f\d+, 0f3F800000;", body)
    assert compares_with_one, "no compare of the weight with 1.0"
    assert re.search(r"selp\.(?:f32|b32)", body), "no select"


# The K-profile EMA: per 128-bit vector of weights, one (non-coherent) load of the weights
# and, per profile, one load and one store of the shadow's words, for every K compiled.
MULTI_EMA_PAIRS = {  # (weights, shadow) as demangled, and shadow words per weights word
    ("float", "float"): 1,
    ("c10::BFloat16", "c10::BFloat16"): 1,
    ("c10::BFloat16", "float"): 2,
    ("c10::Half", "float"): 2,
    ("double", "double"): 1,
}
MAX_PROFILES = 8  # csrc/profiles.h


@pytest.mark.parametrize("kernel", ["flat_kernel", "list_kernel"])
@pytest.mark.parametrize("pair", list(MULTI_EMA_PAIRS), ids="-".join)
@pytest.mark.parametrize("k", range(1, MAX_PROFILES + 1))
def test_multi_ema_reads_the_weights_once(compiled, kernel, pair, k):
    _, kernels = compiled
    op = f"MultiEmaOp<{pair[0]}, {pair[1]}, {k}>"
    (body,) = [b for name, b in kernels.items() if kernel in name and op in name]
    weights_loads = len(re.findall(r"ld\.global\.nc(\.\w+)*\.v4\.", body))
    shadow_loads = len(re.findall(r"ld\.global\.v[24]\.", body))
    shadow_stores = len(re.findall(r"st\.global\.v[24]\.", body))
    words = MULTI_EMA_PAIRS[pair]
    assert weights_loads > 0, "no 128-bit load of the weights"
    assert shadow_loads == k * words * weights_loads, (weights_loads, shadow_loads)
    assert shadow_stores == k * words * weights_loads, (weights_loads, shadow_stores)


# The fused optimizer steps (adam_average_, sgd_average_): compiled for every dtype pair,
# flat and list; their spills and 128-bit accesses are checked with every other functor
# above (fast_paths finds them by name).
FUSED_PAIRS = [
    "float, float",
    "double, double",
    "c10::BFloat16, c10::BFloat16",
    "c10::Half, c10::Half",
    "c10::BFloat16, float",
    "c10::Half, float",
]


@pytest.mark.parametrize("kernel", ["flat_kernel", "list_kernel"])
@pytest.mark.parametrize("op", ["AdamAverageOp", "SgdAverageOp"])
def test_fused_steps_are_compiled_for_every_pair(compiled, kernel, op):
    _, kernels = compiled
    for pair in FUSED_PAIRS:
        functor = f"{op}<{pair}>"
        bodies = [b for name, b in kernels.items() if kernel in name and functor in name]
        assert len(bodies) == 1, f"{kernel}<{functor}>: {len(bodies)} kernels"
        if pair in FAST_PAIRS:
            assert functor in fast_paths(kernels, pair)
