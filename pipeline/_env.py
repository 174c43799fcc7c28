"""The machine: which device runs the work (the one device resolver), and what machine and
libraries a result came from (for benchmarks' JSON and run provenance)."""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path

import torch

from advlens.errors import ConfigError


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU: every "auto" device choice asks this."""
    return bool(torch.cuda.is_available())


def gpu_count() -> int:
    """How many CUDA GPUs torch sees."""
    return int(torch.cuda.device_count())


def resolve_device(name: str = "auto", setting: str = "model.device") -> torch.device:
    """``auto`` -> the first CUDA GPU when there is one, else the CPU; another name is checked.

    A name torch does not know, or a CUDA device on a machine without one, is a ConfigError
    naming ``setting`` (the setting the name came from).
    """
    if name == "auto":
        return torch.device("cuda" if has_cuda() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} = {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not has_cuda():
        raise ConfigError(f"{setting} = {name!r} but no CUDA GPU is visible; use cpu or auto")
    return device


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
