"""``small-cnn``: the default Fashion-MNIST network, trained by ``advlens train``.

Two 3x3 convolution blocks with max pooling, a hidden dense layer and the logits: six
tappable layers named conv1, pool1, conv2, pool2, fc1, logits. Small enough to train to
about 90% test accuracy on Fashion-MNIST in a couple of minutes on two CPU cores.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from advlens.models import register

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


@register("small-cnn")
def build(cfg, dataset: str, in_shape, n_classes: int, *, weights: bool = True) -> nn.Module:
    """The small CNN; without ``cfg.checkpoint`` the cached trained weights (trained if missing)."""
    from advlens.models import load_checkpoint

    model = SmallCNN(tuple(in_shape), n_classes)
    if not weights:
        return model
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
        return model
    from advlens.errors import ConfigError
    from advlens.train import TRAINABLE, AdvRecipe, ensure_trained

    if dataset not in TRAINABLE:
        raise ConfigError(
            f"small-cnn has no trained weights for dataset {dataset!r} (advlens trains it on "
            f"{', '.join(TRAINABLE)}): set model.checkpoint to a state dict file"
        )
    # Progress bar unless logging is quiet (`advlens --quiet` sets WARNING).
    progress = logging.getLogger("advlens").isEnabledFor(logging.INFO)
    recipe = (
        AdvRecipe(cfg.adversarial, cfg.adversarial_eps, cfg.adversarial_steps)
        if getattr(cfg, "adversarial", None)
        else None
    )
    path = ensure_trained(
        dataset, seed=cfg.train_seed, epochs=cfg.train_epochs, progress=progress,
        adversarial=recipe,
    )  # fmt: skip
    load_checkpoint(model, path)
    return model
