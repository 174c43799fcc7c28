"""Model zoo: a registry of network builders, checkpoint loading (the device: advlens._env).

Built-in names: ``small-cnn`` (trained by advlens), ``wrn-28-10`` (RobustBench parameter
names; also ``wrn-<depth>-<width>``), ``denser`` (a DENSER Keras HDF5 file), any
``package.module:factory`` and, where installed, ``torchvision:<name>`` / ``timm:<name>``.
Every model built here takes images in [0, 1]; normalisation lives inside the module.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advlens._env import resolve_device
from advlens.models.base import (
    WRN_NAME,
    ModelFactory,
    ModelRequest,
    load_checkpoint,
    read_state_dict,
    strip_prefixes,
)
from advlens.registry import Registry

# name -> builder; implementations are imported on first use (h5py, timm, ... only when used)
MODELS: Registry[ModelFactory] = Registry("model", setting="model.name")
MODELS.register("small-cnn", "advlens.models.small_cnn:build")
MODELS.register("wrn-28-10", "advlens.models.wrn:build")
MODELS.register("denser", "advlens.models.denser:build")
MODELS.register_pattern(WRN_NAME.pattern, "advlens.models.wrn:build", shown="wrn-<depth>-<width>")
MODELS.register_pattern(r"[^:]+:.+", "advlens.models.user:build", shown="package.module:function")
register = MODELS.register  # ``@register("my-net")`` adds a builder

__all__ = [
    "MODELS",
    "ModelFactory",
    "ModelRequest",
    "build_model",
    "fingerprint",
    "get_factory",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register",
    "resolve_device",
    "strip_prefixes",
    "weights_digest",
]


def list_models() -> list[str]:
    """Registered model names (user ``module:factory`` names work too)."""
    return sorted(MODELS.names())


def get_factory(name: str) -> ModelFactory:
    """The builder registered as ``name`` (imports its module on first use)."""
    return MODELS.get(name)


def build_model(
    cfg: Any, dataset: str, in_shape: tuple[int, ...], n_classes: int, *, weights: bool = True
) -> nn.Module:
    """Build ``cfg.name`` for ``dataset`` images of ``in_shape`` (C, H, W): eval mode, frozen.

    The parameters do not require gradients (attacks need gradients of the input only); the
    model sits on :func:`resolve_device` (``cfg.device``). ``weights=False`` skips loading
    (or training) weights where the architecture alone is known: enough to list layers.
    """
    shape = tuple(int(s) for s in in_shape)  # ModelRequest refuses anything but (C, H, W)
    request = ModelRequest(cfg, dataset, shape, int(n_classes), weights)  # type: ignore[arg-type]
    model = get_factory(cfg.name)(request)
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(getattr(cfg, "device", "auto")))


def weights_digest(model: nn.Module, h: Any) -> str:
    """``h`` (a hashlib object) fed with every tensor of ``model``'s state dict (names, dtypes,
    shapes, bytes); its hex digest."""
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(cfg: Any, model: nn.Module) -> dict[str, str]:
    """Content hashes that identify a built model, for the store's identity.

    ``weights_sha256`` hashes every tensor of the state dict (names, dtypes, shapes, bytes),
    wherever the weights came from (a checkpoint, the trained cache, a Keras file); for a
    ``module:factory`` model, ``source_sha256`` hashes the module's source file.
    """
    out = {"weights_sha256": weights_digest(model, hashlib.sha256())}
    module_name, sep, _ = cfg.name.partition(":")
    if sep and module_name not in ("torchvision", "timm"):
        module = importlib.import_module(module_name)
        source = getattr(module, "__file__", None)
        if source and Path(source).is_file():
            out["source_sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return out
