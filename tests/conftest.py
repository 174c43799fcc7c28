"""Shared fixtures. GPU tests carry ``@pytest.mark.gpu`` and are skipped without a GPU."""

from __future__ import annotations

import os

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
