"""backends() compares each GPU's compute capability with the archs the CUDA kernels were
built for, and asks the current device whether it can load them. Checked here with a
stand-in for the compiled module and for torch's device queries (no GPU on CI)."""

from types import SimpleNamespace

import pytest
import torch

from belay_kernels.backend import _library


def fake_module(arches="750,800,900", error=""):  # as __CUDA_ARCH_LIST__ reads
    return SimpleNamespace(built_arches=lambda: arches, kernel_image_error=lambda index: error)


@pytest.fixture
def gpus(monkeypatch):
    def install(*capabilities):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    return install


def test_a_gpu_the_build_covers_is_fine(gpus):
    gpus((8, 6), (9, 0))
    assert _library._arch_mismatch(fake_module()) == ""


def test_a_gpu_older_than_every_built_arch_is_reported(gpus):
    gpus((9, 0), (7, 0))
    reason = _library._arch_mismatch(fake_module())
    assert "cuda:1 has compute capability 7.0" in reason
    assert "sm_75, sm_80, sm_90" in reason and "TORCH_CUDA_ARCH_LIST=7.0" in reason


def test_a_device_that_cannot_load_the_kernels_is_reported(gpus):
    gpus((12, 0))
    reason = _library._arch_mismatch(
        fake_module("800", "no kernel image is available for execution on the device")
    )
    assert "cuda:0 (compute capability 12.0) cannot load" in reason
    assert "no kernel image" in reason and '"12.0+PTX"' in reason
