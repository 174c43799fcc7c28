"""Model zoo: a registry of network builders, checkpoint loading and device selection.

Built-in names: ``small-cnn`` (trained by advlens), ``wrn-28-10`` (RobustBench parameter
names; also ``wrn-<depth>-<width>``), ``denser`` (a DENSER Keras HDF5 file), any
``package.module:factory`` and, where installed, ``torchvision:<name>`` / ``timm:<name>``.
Every model built here takes images in [0, 1]; normalisation lives inside the module.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advlens.errors import ConfigError, closest

# name -> module that registers it on import (imported lazily: torch, h5py, ... only when used)
BUILTIN = {
    "small-cnn": "advlens.models.small_cnn",
    "wrn-28-10": "advlens.models.wrn",
    "denser": "advlens.models.denser",
}
_REGISTRY: dict[str, Callable[..., Any]] = {}
WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``factory(cfg, dataset, in_shape, n_classes, *, weights=True) -> nn.Module``."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = factory
        return factory

    return deco


def list_models() -> list[str]:
    """Registered model names (user ``module:factory`` names work too)."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get_factory(name: str) -> Callable[..., Any]:
    """The builder registered as ``name`` (imports its module on first use)."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name in _REGISTRY:
        return _REGISTRY[name]
    if WRN_NAME.match(name):
        from advlens.models import wrn

        return wrn.build
    if ":" in name:
        from advlens.models import user

        return user.build
    raise ConfigError(
        f"model.name = {name!r} is not a known model; {closest(name, list_models())}; "
        "or name a factory as 'package.module:function'"
    )


def build_model(cfg, dataset: str, in_shape, n_classes: int, *, weights: bool = True):
    """Build ``cfg.name`` for ``dataset`` images of ``in_shape`` (C, H, W): eval mode, frozen.

    The parameters do not require gradients (attacks need gradients of the input only); the
    model sits on :func:`resolve_device` (``cfg.device``). ``weights=False`` skips loading
    (or training) weights where the architecture alone is known: enough to list layers.
    """
    factory = get_factory(cfg.name)
    shape = tuple(int(s) for s in in_shape)
    model = factory(cfg, dataset, shape, int(n_classes), weights=weights)
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(getattr(cfg, "device", "auto")))


def resolve_device(name: str = "auto"):
    """``auto`` -> the first CUDA GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device = {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device = {name!r} but no CUDA GPU is visible; use cpu or auto")
    return device


def weights_digest(model, h) -> str:
    """``h`` (a hashlib object) fed with every tensor of ``model``'s state dict (names, dtypes,
    shapes, bytes); its hex digest."""
    import torch

    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(cfg, model) -> dict[str, str]:
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


# Wrappers in which training scripts save a state dict; prefixes DataParallel / wrappers add.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.")


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; unwrap and strip prefixes.

    A checkpoint holding pickled code or arbitrary objects is refused with a ConfigError.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint = {str(path)!r}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's wording changes between releases ("Unsupported global: GLOBAL x.y" in 2.4,
        # "Weights only load failed ... unsupported GLOBAL x.y whose module ..." later).
        text = str(exc)
        found = re.search(r"GLOBAL\s+([\w.]+)", text, flags=re.IGNORECASE)
        if found is None:
            raise ConfigError(
                f"model.checkpoint = {str(path)!r}: not a torch checkpoint (unreadable pickle)"
            ) from None
        raise ConfigError(
            f"model.checkpoint = {str(path)!r} is not a weights-only file: it holds pickled "
            f"code or objects ({found.group(1)}), which advlens refuses to load (torch.load with "
            "weights_only=True). Save a plain state dict instead: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConfigError(
            f"model.checkpoint = {str(path)!r}: not a torch checkpoint ({exc})"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.checkpoint = {str(path)!r} is not a state dict (name -> tensor); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return strip_prefixes(obj)


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Remove a ``module.`` / ``model.`` prefix that every key carries (repeatedly)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_checkpoint(model, path: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Load the state dict at ``path`` into ``model`` strictly, naming mismatched keys.

    Keys starting with one of ``ignore`` are dropped first (parts the forward never uses).
    """
    import torch

    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    own = model.state_dict()
    for k in own:  # older PyTorch saved batch norms without this counter (unused in eval)
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(own[k]) if own[k].device.type != "meta" else torch.tensor(0)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])}...)")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])}...)")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches ({k}: checkpoint {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise ConfigError(
            f"model.checkpoint = {str(path)!r} does not fit model {type(model).__name__}: "
            + "; ".join(parts)
        )
    meta = any(t.is_meta for t in own.values())
    if meta:  # assigned tensors keep their dtype: match the model's (a checkpoint may be half)
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=meta)
