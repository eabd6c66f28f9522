"""What ``backend="auto"`` takes on each device type, and why: the text of
``belay-kernels backends``. It measures nothing; a backend whose choice needs a
measurement (inductor) says what it measured so far."""

from __future__ import annotations

from ._backends import _FALLBACK_ORDER, AUTO_ORDER, _load

DESCRIBED_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def explain_auto(device_type: str) -> str:
    """The backends auto tries on ``device_type`` in order, why each earlier one is passed
    over, and which one it takes for contiguous tensors."""
    steps = []
    for name in AUTO_ORDER.get(device_type, _FALLBACK_ORDER):
        status = _load(name)
        if not status.available:
            steps.append(f"not {name} ({status.reason.splitlines()[0]})")
            continue
        if device_type not in status.module.DEVICE_TYPES:
            steps.append(f"not {name} (does not run on {device_type})")
            continue
        verdicts = getattr(status.module, "verdicts", None)
        if verdicts is not None:
            measured = [(k[0], v) for k, v in verdicts().items() if k[1] == device_type]
            if not measured:
                steps.append(
                    f"{name} where it measures faster than torch (measured at the "
                    "first op of each dtype pair; nothing measured yet)"
                )
            else:
                steps.append(
                    f"{name} per op: "
                    + "; ".join(
                        f"{op} {'taken' if taken else 'not taken'} ({why})"
                        for op, (taken, why) in measured
                    )
                )
            continue
        if name == "torch":
            steps.append("takes torch (the pure-PyTorch backend, which runs anywhere)")
        else:
            steps.append(
                f"takes {name} (its kernels load here; ops, dtypes or layouts it "
                "lacks go further down)"
            )
        break
    return ", then ".join(steps)
