"""What machine and libraries a result came from: for benchmarks' JSON and run provenance."""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: object = "cpu") -> str:
    """The GPU's name for a CUDA device (str or ``torch.device``), else the CPU model."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(str(device)))
    return cpu_name()


def versions(*packages: str) -> dict[str, str | None]:
    """Installed version of each distribution (None when missing), plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
