"""``small-cnn``: the default Fashion-MNIST network, trained by ``advlens train``.

Its cached weights live under ``$ADVLENS_CACHE/models`` (:func:`weights_path`); this module
only reads them, :mod:`advlens.train` makes them.

Two 3x3 convolution blocks with max pooling, a hidden dense layer and the logits: six
tappable layers named conv1, pool1, conv2, pool2, fc1, logits. Small enough to train to
about 90% test accuracy on Fashion-MNIST in a couple of minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advlens.config import AdvRecipe
from advlens.errors import ConfigError
from advlens.models.base import ModelRequest, load_checkpoint

TRAINABLE = ("fashion-mnist", "synthetic")  # datasets `advlens train` trains it on
TAPS = ("conv1", "pool1", "conv2", "pool2", "fc1", "logits")


class SmallCNN(nn.Module):
    """conv(16)-pool-conv(32)-pool-dense(128)-logits for (C, H, W) inputs in [0, 1]."""

    advlens_taps = TAPS
    advlens_auto = TAPS

    def __init__(self, in_shape: tuple[int, int, int] = (1, 28, 28), n_classes: int = 10):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU())
        self.logits = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        return self.logits(self.fc1(x))


def build(request: ModelRequest) -> nn.Module:
    """The small CNN with ``cfg.checkpoint`` or, without one, the cached trained weights.

    Building never trains: missing cached weights are a ConfigError that says which
    ``advlens train`` command makes them (``advlens run`` and the Python API train first).
    """
    cfg = request.cfg
    model = SmallCNN(request.in_shape, request.n_classes)
    if not request.weights:
        return model
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
        return model
    load_checkpoint(model, cached_weights(cfg, request.dataset))
    return model


def recipe_of(cfg: Any) -> AdvRecipe | None:
    """The adversarial-training recipe a :class:`~advlens.config.ModelConfig` asks for."""
    if not getattr(cfg, "adversarial", None):
        return None
    return AdvRecipe(cfg.adversarial, cfg.adversarial_eps, cfg.adversarial_steps)


def cache_dir() -> Path:
    """``$ADVLENS_CACHE`` or ``~/.cache/advlens``."""
    return Path(os.environ.get("ADVLENS_CACHE") or Path.home() / ".cache" / "advlens")


def weights_path(
    dataset: str = "fashion-mnist", seed: int = 0, recipe: AdvRecipe | None = None
) -> Path:
    """Where the trained small CNN for ``dataset``, ``seed`` (and adversarial ``recipe``) is
    cached."""
    tag = f"-{recipe.tag}" if recipe else ""
    return cache_dir() / "models" / f"small-cnn-{dataset}-s{seed}{tag}.pt"


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON written beside cached weights, or None."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_fresh(path: Path, epochs: int, recipe: AdvRecipe | None) -> bool:
    """True when ``path`` holds weights trained for ``epochs`` epochs with ``recipe``."""
    meta = read_sidecar(path)
    want = dataclasses.asdict(recipe) if recipe else None
    return (
        path.is_file()
        and meta is not None
        and meta.get("epochs") == epochs
        and meta.get("adversarial") == want
    )


def cached_weights(cfg: Any, dataset: str) -> Path:
    """The cached weights ``cfg`` (a ModelConfig) names for ``dataset``, or a ConfigError
    saying how to make them."""
    if dataset not in TRAINABLE:
        raise ConfigError(
            f"small-cnn has no trained weights for dataset {dataset!r} (advlens trains it on "
            f"{', '.join(TRAINABLE)}): set model.checkpoint to a state dict file"
        )
    recipe = recipe_of(cfg)
    path = weights_path(dataset, cfg.train_seed, recipe)
    if not is_fresh(path, cfg.train_epochs, recipe):
        adv = (
            f" --adversarial {recipe.method} --eps {recipe.eps:g} --steps {recipe.steps}"
            if recipe
            else ""
        )
        raise ConfigError(
            f"small-cnn: no cached weights for {dataset} (seed {cfg.train_seed}, "
            f"{cfg.train_epochs} epochs) at {path}; train them with `advlens train --dataset "
            f"{dataset} --seed {cfg.train_seed} --epochs {cfg.train_epochs}{adv}` "
            "(advlens run does this by itself), or set model.checkpoint"
        )
    return path
