"""User models: ``package.module:factory``, ``torchvision:<name>`` and ``timm:<name>``.

``factory`` is called as ``factory()``, or with ``num_classes=`` when it accepts that keyword,
and must return a ``torch.nn.Module`` taking [0, 1] images (normalisation inside the
model). ``model.checkpoint`` (a plain state dict) is loaded with
``torch.load(weights_only=True)``. torchvision/timm models get ImageNet normalisation
prepended; their pretrained weights are not downloaded (pass a checkpoint).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from advlens._optional import require
from advlens.errors import ConfigError
from advlens.models.base import ModelRequest, load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for [0, 1] inputs; taps keep the inner model's names."""

    mean: torch.Tensor  # buffers, (1, C, 1, 1)
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _call(factory, n_classes: int, where: str) -> nn.Module:
    try:
        params: Mapping[str, inspect.Parameter] = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"num_classes": n_classes} if "num_classes" in params else {}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name = {where!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def cwd_importable() -> None:
    """Put the current directory on ``sys.path``: `advlens` is a console script, whose path
    lacks it, and a user's my_model.py beside their data is found as `my_model:factory`, as
    with `python -m`."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def build(request: ModelRequest) -> nn.Module:
    """Build ``cfg.name`` = ``module:factory`` / ``torchvision:name`` / ``timm:name``."""
    cfg, n_classes = request.cfg, request.n_classes
    module_name, _, attr = cfg.name.partition(":")
    if module_name in ("torchvision", "timm"):
        model = _hub(module_name, attr, n_classes)
    else:
        cwd_importable()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"model.name = {cfg.name!r}: cannot import {module_name!r} ({exc})"
            ) from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ConfigError(f"model.name = {cfg.name!r}: {module_name} has no callable {attr!r}")
        model = _call(factory, n_classes, cfg.name)
    if request.weights and cfg.checkpoint:
        inner = model.model if isinstance(model, Normalized) else model
        load_checkpoint(inner, cfg.checkpoint)
    return model


def _hub(lib: str, name: str, n_classes: int) -> nn.Module:
    mod = require(lib, f"model.name = '{lib}:{name}'")
    if lib == "torchvision":
        try:
            model = mod.models.get_model(name, weights=None, num_classes=n_classes)
        except ValueError as exc:
            raise ConfigError(f"model.name = 'torchvision:{name}': {exc}") from None
    else:
        try:
            model = mod.create_model(name, pretrained=False, num_classes=n_classes)
        except RuntimeError as exc:
            raise ConfigError(f"model.name = 'timm:{name}': {exc}") from None
    return Normalized(model, IMAGENET_MEAN, IMAGENET_STD)
