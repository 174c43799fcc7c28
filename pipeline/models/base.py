"""The model family's interface: the builder signature and checkpoint loading.

Every implementation (one module each: ``small_cnn``, ``wrn``, ``denser``, ``user``) provides
a :class:`ModelFactory`, called with one :class:`ModelRequest`, and loads weights through
:func:`load_checkpoint`; the registry and :func:`advlens.models.build_model` live in the
package (docs/design.md, "Registries").
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from advlens.config import ModelConfig
from advlens.errors import ConfigError

WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")


@dataclass(frozen=True)
class ModelRequest:
    """What a builder is asked to build: the model settings, the dataset's name, the images'
    (C, H, W) and the number of classes; ``weights=False`` asks for the architecture alone
    (enough to list layers)."""

    cfg: ModelConfig
    dataset: str
    in_shape: tuple[int, int, int]
    n_classes: int
    weights: bool = True

    def __post_init__(self) -> None:
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape}")


class ModelFactory(Protocol):
    """``factory(request) -> nn.Module``: the network for a :class:`ModelRequest`.

    The module takes images in [0, 1] (normalisation inside).
    """

    def __call__(self, request: ModelRequest) -> nn.Module: ...


# Wrappers in which training scripts save a state dict; prefixes DataParallel / wrappers add.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.")


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; unwrap and strip prefixes.

    A checkpoint holding pickled code or arbitrary objects is refused with a ConfigError.
    """
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


def load_checkpoint(model: nn.Module, path: str | Path, ignore: tuple[str, ...] = ()) -> None:
    """Load the state dict at ``path`` into ``model`` strictly, naming mismatched keys.

    Keys starting with one of ``ignore`` are dropped first (parts the forward never uses).
    """
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
