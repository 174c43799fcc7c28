"""Shared fixtures. GPU tests carry ``@pytest.mark.gpu`` and are skipped without a GPU.

``xp``: one array backend per parameter (numpy, torch on the CPU, and, marked ``gpu``, torch
CUDA and cupy), for the kernel tests that hold a backend's result to the NumPy reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Idle OpenMP threads spin by default; on a busy 2-core machine that slows t-SNE many times over.
# Read when OpenMP first loads, so it is set before advlens (torch) is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from advlens._env import has_cuda  # noqa: E402  (after the environment above)


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_log_handlers():
    """For tests that call the CLI's main(): it binds logging to the stderr of the test that
    first ran it, which capsys closes; each test gets the root logger without handlers."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep each test to the machine's cores (CI has 2) and make torch deterministic."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def fmnist_model():
    """The default small CNN trained on Fashion-MNIST (cached under $ADVLENS_CACHE) and the test split.

    Trains once per machine (a few minutes on 2 cores); later sessions load the cached weights.
    """
    from advlens.config import ModelConfig
    from advlens.data import FASHION_MNIST_DIR, load_dataset
    from advlens.models import build_model

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    test = load_dataset("fashion-mnist", split="test")
    from advlens.train import ensure_weights

    cfg = ModelConfig(name="small-cnn")
    ensure_weights(cfg, "fashion-mnist")  # building never trains; the caller does
    model = build_model(cfg, "fashion-mnist", test.images.shape[1:], 10)
    return model, test


@dataclass(frozen=True)
class Backend:
    """An array library as the kernels see it: ``asarray`` moves a NumPy array in, ``to_numpy``
    brings a result back, ``is_type`` tells whether a result kept the backend's array type."""

    name: str
    asarray: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    is_type: Callable[[Any], bool]


def _torch_backend(device: str) -> Backend:
    import torch

    return Backend(
        "torch" if device == "cpu" else f"torch-{device}",
        lambda a: torch.as_tensor(a, device=device),
        lambda t: t.detach().cpu().numpy(),
        lambda t: isinstance(t, torch.Tensor) and t.device.type == device,
    )


def _cupy_backend() -> Backend:
    cp = pytest.importorskip("cupy", reason="cupy is not installed (pip install -e .[gpu])")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy sees no CUDA device")
    except Exception as err:  # cupy imports without a driver; any CUDA error means no device
        pytest.skip(f"cupy cannot reach a CUDA device: {err}")
    return Backend("cupy", cp.asarray, cp.asnumpy, lambda a: isinstance(a, cp.ndarray))


def _backend(name: str) -> Backend:
    if name == "numpy":
        return Backend("numpy", np.asarray, np.asarray, lambda a: isinstance(a, np.ndarray))
    if name == "torch":
        return _torch_backend("cpu")
    if name == "torch-cuda":
        if not has_cuda():
            pytest.skip("needs a CUDA GPU")
        return _torch_backend("cuda")
    return _cupy_backend()


GPU_BACKENDS = [pytest.param(name, marks=pytest.mark.gpu) for name in ("torch-cuda", "cupy")]


@pytest.fixture(params=["numpy", "torch", *GPU_BACKENDS])
def xp(request) -> Backend:
    """Each array backend in turn; the GPU ones are skipped, with the reason, where unusable."""
    return _backend(request.param)


@pytest.fixture(params=GPU_BACKENDS)
def gpu_xp(request) -> Backend:
    """The GPU backends only (torch CUDA, cupy), for sizes the CPU reference is checked at."""
    return _backend(request.param)
