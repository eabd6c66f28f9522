"""What the README says of the bits under each ATen CPU capability (``ATEN_CPU_CAPABILITY``
``default``, ``avx2``, ``avx512``; each one this CPU has, in a process of its own, on every
op, dtype pair and layout; tests/_capabilities.py computes it):

- the torch backend writes the reference's very bits under every capability;
- the reference itself moves with ATen's ``lerp``, whose AVX2 and AVX-512 kernels fuse the
  multiply-add and whose default kernels round the product first: EMA, SWA, BELAY and the
  K-profile EMA give the same bits wherever the lerp rounds the same way, the two-point
  average and the swap the same bits everywhere;
- the C++ kernels fuse their multiply-adds whatever ATen runs: they write the reference's
  bits where its lerp fuses (but for the sign of a NaN stored into fp16: the reference
  stores 0x7E00 for every NaN) and are within one unit in the last place of it where it
  does not.
"""

import pytest
from _capabilities import CAPABILITIES, run_under, supported
from _extension_cases import require_backend

LERPS = ("ema", "swa", "belay", "multi_ema")

_reports: dict[str, dict] = {}


def _report(capability: str) -> dict:
    if not supported(capability):
        pytest.skip(f"ATen does not run the {capability} kernels on this CPU")
    if capability not in _reports:
        _reports[capability] = run_under(capability)
    report = _reports[capability]
    assert report["capability"] == capability
    return report


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_torch_backend_writes_the_references_bits(capability):
    rows = _report(capability)["rows"]
    differ = [r["case"] for r in rows if r["torch"]["bits"] != "equal"]
    assert not differ, f"{len(differ)} of {len(rows)} calls differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_cpp_against_the_reference(capability):
    require_backend("cpp")
    report = _report(capability)
    assert "cpp" in report["backends"], "the C++ backend did not load in the child process"
    for row in report["rows"]:
        got = row["cpp"]
        if row["method"] not in LERPS:
            assert got["bits"] == "equal", row["case"]
        elif report["lerp"] == "fused":
            assert got["bits"] == "equal" or (
                got["bits"] == "nan-bits" and "float16" in row["pair"]
            ), row["case"]
        else:
            assert got["ulps"] <= 1, (row["case"], got)


def test_the_reference_moves_only_with_the_lerp():
    reports = [_reports.get(c) or _report(c) for c in CAPABILITIES if supported(c)]
    if len(reports) < 2:
        pytest.skip("ATen runs one capability on this CPU: nothing to compare")
    first = reports[0]
    for other in reports[1:]:
        for a, b in zip(first["rows"], other["rows"], strict=True):
            assert a["case"] == b["case"]
            if a["method"] not in LERPS or first["lerp"] == other["lerp"]:
                assert a["reference"] == b["reference"], (
                    a["case"],
                    first["capability"],
                    other["capability"],
                )
