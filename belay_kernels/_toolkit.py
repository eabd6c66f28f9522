"""Finds the CUDA toolkit root, for setup.py (which loads this file by path, before torch
guesses one) and for the tests' PTX checks. Standard library only.

torch takes the folder above the first ``nvcc`` on PATH as the toolkit root; where that
``nvcc`` is a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) the guess has no
headers, and the CUDA kernels are silently not built. Here a symlink is resolved, a script
is read for the real ``nvcc`` it runs, and the usual install folders are probed last.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

# Absolute paths ending in bin/nvcc, as a wrapper script names the compiler it runs.
_NVCC_IN_SCRIPT = re.compile(r"(/[^\s'\"`;|&()]*/bin/nvcc)(?![\w.-])")
_USUAL_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda", "/usr/lib/cuda")


class Toolkit:
    """A toolkit root (``root``; None when none was found), how it was found, and every
    candidate tried with why it was rejected. (A plain class: setup.py loads this file by
    path, outside any package, where a dataclass cannot find its module.)"""

    def __init__(self, root: str | None, how: str = "", tried: list[str] | None = None):
        self.root, self.how, self.tried = root, how, list(tried or [])

    def describe(self) -> str:
        if self.root:
            return f"CUDA toolkit {self.root} ({self.how})"
        return "no CUDA toolkit found: " + "; ".join(self.tried or ["nothing to try"])


def missing_parts(root: str) -> list[str]:
    """What a folder lacks to be a toolkit root: [] when it is one."""
    wanted = (os.path.join("bin", "nvcc"), os.path.join("include", "cuda_runtime.h"))
    return [part for part in wanted if not os.path.isfile(os.path.join(root, part))]


def _version_key(path: str):
    numbers = re.findall(r"\d+", os.path.basename(path))
    return [int(n) for n in numbers] or [-1]


def _script_targets(path: str) -> list[str]:
    """The nvcc paths a small text script names (a wrapper that execs the real one)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return []
    if not head.startswith(b"#!") or b"\0" in head:
        return []
    return _NVCC_IN_SCRIPT.findall(head.decode("utf-8", "replace"))


def _nvcc_roots(nvcc: str, depth: int = 0) -> list[tuple[str, str]]:
    """(candidate root, how) for one nvcc: its own folder, its resolved target's, and, for
    a wrapper script, those of the nvcc it runs."""
    found = [(os.path.dirname(os.path.dirname(os.path.abspath(nvcc))), f"nvcc at {nvcc}")]
    real = os.path.realpath(nvcc)
    if real != os.path.abspath(nvcc):
        found.append((os.path.dirname(os.path.dirname(real)), f"{nvcc} links to {real}"))
    if depth < 3:
        for target in _script_targets(real):
            for root, how in _nvcc_roots(target, depth + 1):
                found.append(
                    (
                        root,
                        f"{nvcc} is a script that runs {target}"
                        if how.startswith("nvcc at")
                        else how,
                    )
                )
    return found


def find_toolkit(environ=None, which=shutil.which, usual_roots=_USUAL_ROOTS) -> Toolkit:
    """The CUDA toolkit root: $CUDA_HOME (or $CUDA_PATH) when set, else the real toolkit
    behind the ``nvcc`` on PATH, else the first usual install folder that is a toolkit.

    A set $CUDA_HOME is taken at its word: when it is not a toolkit root the answer is
    "none", with the reason, rather than a different toolkit than the one asked for.
    """
    environ = os.environ if environ is None else environ
    tried: list[str] = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(name)
        if root:
            missing = missing_parts(root)
            if not missing:
                return Toolkit(root, f"${name}", tried)
            tried.append(f"{name}={root} is not a toolkit root (no {' or '.join(missing)})")
            return Toolkit(None, "", tried)
    candidates: list[tuple[str, str]] = []
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates += _nvcc_roots(nvcc)
    else:
        tried.append("no nvcc on PATH")
    for pattern in usual_roots:
        for root in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            candidates.append((root, f"probed {root}"))
    seen = set()
    for root, how in candidates:
        if root in seen:
            continue
        seen.add(root)
        missing = missing_parts(root)
        if not missing:
            return Toolkit(root, how, tried)
        tried.append(f"{root} ({how}) has no {' or '.join(missing)}")
    return Toolkit(None, "", tried)


class _DropTorchCudaHomeGuess:
    """A logging filter for torch's "No CUDA runtime is found, using CUDA_HOME=..." warning,
    which torch prints whenever it finds a toolkit on a machine without a GPU: building
    needs no GPU, and `belay-kernels backends` says what runs here."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_torch_cuda_home_warning() -> None:
    """Drop that warning; call before torch.utils.cpp_extension is first imported."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropTorchCudaHomeGuess) for f in logger.filters):
        logger.addFilter(_DropTorchCudaHomeGuess())
