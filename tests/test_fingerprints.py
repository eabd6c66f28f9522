"""Every op on every backend available here gives the very bits recorded in
tests/fingerprints.json (see tests/_fingerprints.py for what is hashed and when to
re-record). The torch backend's bits are recorded twice, for ATen's fused and unfused
lerp, and it is checked under this process's capability and under ATen's default one."""

import json

import pytest
from _capabilities import supported
from _extension_cases import require_backend
from _fingerprints import BACKENDS, RECORD, compute_in_subprocess

from belay_kernels import backends

RECORDED = json.loads(RECORD.read_text())


def _check(got: dict[str, str]) -> None:
    labels = {k.split(" ", 1)[0] for k in got}
    assert len(labels) == 1, labels
    (label,) = labels
    want = {k: v for k, v in RECORDED.items() if k.split(" ", 1)[0] == label}
    hint = ": ATen's lerp rounds float32 and float64 differently here" if "mixed" in label else ""
    assert want, f"no fingerprints recorded for {label}{hint}"
    changed = sorted(k for k in want if got.get(k) != want[k])
    assert not changed, f"{len(changed)} of {len(want)} results changed, e.g. {changed[:5]}"
    assert got.keys() == want.keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_bit_identical_to_the_record(backend):
    if backend in ("cpp", "grid"):
        require_backend("cpp")
    if backend == "triton" and "unavailable" in backends()["triton"]:
        pytest.skip(backends()["triton"])
    _check(compute_in_subprocess(backend))


def test_torch_backend_under_atens_default_kernels():
    """Under ATEN_CPU_CAPABILITY=default, where ATen's lerp rounds the product first (on
    x86): the record's ``torch-unfused`` results."""
    if not supported("default"):
        pytest.skip("ATen does not run its default kernels when asked to on this CPU")
    _check(compute_in_subprocess("torch", capability="default"))
