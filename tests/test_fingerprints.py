"""Every op on every backend available here gives the very bits recorded in
tests/fingerprints.json (see tests/_fingerprints.py for what is hashed and when to
re-record)."""

import json

import pytest
from _extension_cases import require_backend
from _fingerprints import BACKENDS, RECORD, compute_in_subprocess

from belay_kernels import backends

RECORDED = json.loads(RECORD.read_text())


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_bit_identical_to_the_record(backend):
    if backend in ("cpp", "grid"):
        require_backend("cpp")
    if backend == "triton" and "unavailable" in backends()["triton"]:
        pytest.skip(backends()["triton"])
    got = compute_in_subprocess(backend)
    want = {k: v for k, v in RECORDED.items() if k.split(" ", 1)[0] == backend}
    assert want, f"no fingerprints recorded for {backend}"
    changed = sorted(k for k in want if got.get(k) != want[k])
    assert not changed, f"{len(changed)} of {len(want)} results changed, e.g. {changed[:5]}"
    assert got.keys() == want.keys()
