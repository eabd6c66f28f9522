"""What the numbers were measured on: machine, versions, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch

VERSIONED = ("torch", "triton", "timm", "ema-pytorch", "torch_ema", "numpy", "belay_kernels")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    if package == "belay_kernels":
        from .. import __version__

        return __version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: torch.device) -> dict:
    from .. import backends
    from .timing import last_level_cache_bytes

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "device_type": device.type,
        "cache_bytes": last_level_cache_bytes(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {name: _version(name) for name in VERSIONED},
        "backends": backends(),
    }
    return info
