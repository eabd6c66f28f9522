"""The CUDA toolkit detection that setup.py and the PTX tests share, on fake toolkits built
in a temporary folder, and the build record that `belay-kernels backends` reads."""

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from belay_kernels import _toolkit
from belay_kernels._toolkit import find_toolkit
from belay_kernels.backend import _library

ROOT = Path(__file__).resolve().parents[1]


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_toolkit(root: Path, headers: bool = True) -> Path:
    _executable(root / "bin" / "nvcc", "#!/bin/sh\necho fake nvcc\n")
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    return root


def test_a_wrapper_script_on_path_leads_to_the_toolkit_it_runs(tmp_path):
    root = _fake_toolkit(tmp_path / "opt" / "cuda-12.9")
    wrapper = _executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    found = find_toolkit({"PATH": str(wrapper.parent)}, usual_roots=())
    assert found.root == str(root)
    assert "is a script that runs" in found.how
    # the folder above the wrapper, torch's own guess, was tried and said why it is not one
    assert any(str(tmp_path) in t and "include/cuda_runtime.h" in t for t in found.tried)


def test_a_symlinked_nvcc_is_resolved(tmp_path):
    root = _fake_toolkit(tmp_path / "cuda")
    (tmp_path / "bin").mkdir()
    os.symlink(root / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    found = find_toolkit({"PATH": str(tmp_path / "bin")}, usual_roots=())
    assert found.root == str(root) and "links to" in found.how


def test_the_reason_names_what_each_candidate_lacks(tmp_path):
    root = _fake_toolkit(tmp_path / "cuda", headers=False)
    _executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    found = find_toolkit({"PATH": str(tmp_path / "bin")}, usual_roots=())
    assert found.root is None
    text = found.describe()
    assert text.startswith("no CUDA toolkit found") and f"{root} (" in text
    assert "include/cuda_runtime.h" in text
    assert (
        "no nvcc on PATH"
        in find_toolkit({"PATH": str(tmp_path / "none")}, usual_roots=()).describe()
    )


def test_usual_roots_are_probed_newest_first(tmp_path):
    for version in ("11.8", "12.10", "12.9"):
        _fake_toolkit(tmp_path / f"cuda-{version}")
    found = find_toolkit({"PATH": ""}, usual_roots=(str(tmp_path / "cuda-*"),))
    assert found.root == str(tmp_path / "cuda-12.10")


def test_a_set_cuda_home_is_taken_at_its_word(tmp_path):
    good = _fake_toolkit(tmp_path / "good")
    _executable(tmp_path / "bin" / "nvcc", f'#!/bin/sh\nexec {good}/bin/nvcc "$@"\n')
    environ = {"PATH": str(tmp_path / "bin"), "CUDA_HOME": str(tmp_path)}
    found = find_toolkit(environ, usual_roots=())
    assert found.root is None
    assert found.describe() == (
        f"no CUDA toolkit found: CUDA_HOME={tmp_path} is not a toolkit "
        "root (no include/cuda_runtime.h)"
    )
    environ["CUDA_HOME"] = str(good)
    assert find_toolkit(environ, usual_roots=()).root == str(good)


def test_setup_py_can_load_the_finder_without_the_package():
    """setup.py loads _toolkit.py by path, before torch or the package is importable."""
    spec = importlib.util.spec_from_file_location("standalone", _toolkit.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.find_toolkit({"PATH": ""}, usual_roots=()).root is None


@pytest.fixture
def build_record(monkeypatch):
    def use(record):
        monkeypatch.setattr(_library, "build_record", lambda: record)
        _library._load.cache_clear()

    yield use
    _library._load.cache_clear()


def test_backends_shows_why_cuda_was_not_built_and_how_to_rebuild(build_record, monkeypatch):
    build_record(
        {
            "parts": {
                "belay_kernels._C_cuda": {
                    "built": False,
                    "reason": "no CUDA toolkit found: /usr/local (nvcc at /usr/local/bin/nvcc) has no "
                    "include/cuda_runtime.h",
                    "rebuild": "CUDA_HOME=/path/to/cuda-toolkit python -m pip install -e .",
                }
            }
        }
    )
    monkeypatch.setitem(sys.modules, "belay_kernels._C_cuda", None)  # import fails
    reason = _library.cuda_unavailable_reason()
    assert reason.startswith(
        "belay_kernels._C_cuda was not built at install time: no CUDA toolkit found: /usr/local"
    )
    assert reason.endswith(
        "Rebuild with: CUDA_HOME=/path/to/cuda-toolkit python -m pip install -e ."
    )


def test_without_a_gpu_backends_says_the_kernels_are_built_and_no_device_is_present(
    build_record, monkeypatch
):
    build_record({})
    try:
        importlib.import_module("belay_kernels._C_cuda")
    except ImportError:
        pytest.skip("the CUDA kernels are not built in this checkout")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _library.cuda_unavailable_reason() == (
        "the CUDA kernels are built, but no CUDA device is present here "
        "(torch.cuda.is_available() is False); they run on a machine with an NVIDIA GPU"
    )


def test_the_record_file_is_git_ignored():
    assert "belay_kernels/_build_info.json" in (ROOT / ".gitignore").read_text().split()
    record = ROOT / "belay_kernels" / "_build_info.json"
    if record.exists():  # written by the build that made this checkout's extension
        assert set(json.loads(record.read_text())["parts"]) == {
            "belay_kernels._C",
            "belay_kernels._C_cuda",
        }
