"""Layer taps: list a model's tappable layers, select them, and read their outputs.

A model may name its taps with class attributes ``advlens_taps`` (module names, e.g.
``("conv1", "block1", ...)``) and ``advlens_auto`` (the main stage outputs that ``auto``
selects); otherwise every leaf module except dropout, identity and flatten is tappable and
``auto`` means the model's top-level children. Hooks copy (clone) outputs because later
in-place operations (``ReLU(inplace=True)``) would overwrite them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from advlens.errors import ConfigError, closest

INPUT = "input"
POOLS = ("none", "gap")
_SKIP = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
)


@dataclass(frozen=True)
class LayerInfo:
    """A tappable layer: module name (``input`` for the image), per-sample output shape."""

    name: str
    shape: tuple[int, ...]
    auto: bool = False  # selected by ``auto`` (a main stage output)
    # The earlier layer whose output is this very tensor (e.g. WRN's block1 returns the output
    # of block1.layer.3): the store keeps one copy (docs/design.md, "Aliases").
    alias_of: str | None = None

    @property
    def size(self) -> int:
        """Number of values per sample (flattened)."""
        return int(np.prod(self.shape))

    def dim(self, pool: str = "none") -> int:
        """Feature dimension once tapped with ``pool`` (gap keeps the channels of (C, H, W))."""
        if pool == "gap" and len(self.shape) == 3 and self.name != INPUT:
            return self.shape[0]
        return self.size


def tap_names(model: nn.Module) -> list[str]:
    """Candidate tap module names (declared by the model or its eligible leaf modules)."""
    declared = getattr(model, "advlens_taps", None)
    if declared is not None:
        return list(declared)
    return [
        name
        for name, m in model.named_modules()
        if name and not any(True for _ in m.children()) and not isinstance(m, _SKIP)
    ]


def _auto_names(model: nn.Module) -> set[str]:
    declared = getattr(model, "advlens_auto", None)
    if declared is not None:
        return set(declared)
    return {name for name, m in model.named_children() if not isinstance(m, _SKIP)}


def catalog(model: nn.Module, in_shape: Sequence[int]) -> list[LayerInfo]:
    """Tappable layers in forward order with per-sample output shapes; first entry ``input``.

    Runs one forward pass on a zero image (in eval mode, without gradients). A module that
    runs several times per forward is recorded with its last call; modules that never run
    are left out.
    """
    names = tap_names(model)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"model declares taps {missing} that are not modules of it")
    order: dict[str, tuple[int, ...]] = {}
    keys: dict[str, tuple] = {}
    keep: list[torch.Tensor] = []  # held so that no storage is reused during the probe

    def hook(name):
        def fn(_m, _inp, out):
            out = _first_tensor(out)
            order.pop(name, None)  # a repeated call moves to its last position
            order[name] = tuple(out.shape[1:])
            keys[name] = tensor_key(out)
            keep.append(out)

        return fn

    _probe(model, in_shape, {modules[n]: hook(n) for n in names})
    auto = _auto_names(model)
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for name in order:  # the first layer in forward order to give a tensor owns it
        alias_of = first.setdefault(keys[name], name)
        if alias_of != name:
            alias[name] = alias_of
    infos = [LayerInfo(INPUT, tuple(int(s) for s in in_shape), auto=False)]
    infos += [LayerInfo(n, s, auto=n in auto, alias_of=alias.get(n)) for n, s in order.items()]
    if not any(i.auto for i in infos):  # e.g. a single Sequential child: then all are main
        infos = [dataclasses.replace(i, auto=i.name != INPUT) for i in infos]
    return infos


def _probe(model: nn.Module, in_shape: Sequence[int], hooks: dict) -> None:
    """One forward pass of a zero image in eval mode, without gradients, with ``hooks``
    ({module: forward hook}) registered for it only."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros((1, *[int(s) for s in in_shape]), device=_device(model))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def tensor_key(t: torch.Tensor) -> tuple:
    """What makes two module outputs the same values: the same storage, offset, shape and
    strides, and no in-place change in between (``_version``; ``ReLU(inplace=True)`` shares
    its input's storage but changes it, so it is not an alias of that input)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t._version, t.dtype)  # fmt: skip


def layer_aliases(catalog: Sequence[LayerInfo], layers: Sequence[str]) -> dict[str, str]:
    """``{alias: layer}`` among the selected ``layers``: each layer that is the same tensor as
    an earlier selected one maps to the first of them."""
    chosen = set(layers)
    owner: dict[str, str] = {}
    out: dict[str, str] = {}
    for info in catalog:
        if info.name not in chosen:
            continue
        root = info.alias_of or info.name
        if root in owner:
            out[info.name] = owner[root]
        else:
            owner[root] = info.name
    return out


def activation_values(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Values per sample that one forward pass produces across all leaf modules.

    The outputs of an in-place module (``ReLU(inplace=True)``) share their input's storage and
    are counted once. Autograd keeps about this much per sample for the backward pass, which
    is what sizes an attack's memory (see :func:`advlens.extract.plan_sub_batch`).
    """
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # held so that no storage is reused during the probe

    def fn(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            keep.append(out)
            seen[out.untyped_storage().data_ptr()] = out.numel()

    _probe(model, in_shape, {m: fn for m in model.modules() if not any(True for _ in m.children())})
    return int(sum(seen.values()))


def select_layers(
    catalog: Sequence[LayerInfo], patterns: Sequence[str], include_input: bool = True
) -> list[str]:
    """Names selected by ``patterns`` (exact names, globs, ``auto``, ``all``) in catalog order.

    ``input`` comes first when ``include_input`` (or when a pattern names it). A pattern that
    matches nothing raises ConfigError listing the closest layer names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    layers = [i.name for i in catalog if i.name != INPUT]
    chosen: set[str] = set()
    for pat in patterns:
        if pat == "all":
            hit = set(layers)
        elif pat == "auto":
            hit = {i.name for i in catalog if i.auto}
        elif pat == INPUT:
            hit = {INPUT}
        else:
            hit = {n for n in layers if fnmatch.fnmatchcase(n, pat)}
        if not hit:
            raise ConfigError(
                f"layers.select: {pat!r} matches no layer of this model; "
                f"{closest(pat, [INPUT, *layers])} (see `advlens layers --model ...`)"
            )
        chosen |= hit
    if include_input:
        chosen.add(INPUT)
    return [i.name for i in catalog if i.name in chosen]


def tap_forward(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    pool: str = "none",
    grad: bool = False,
    aliases: dict[str, str] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model(x)``; return the logits and ``{layer: (B, D) activations}``.

    ``aliases`` (``{alias: layer}``, :func:`layer_aliases`): those layers are not copied and
    not returned; each is checked to be the same tensor as its layer in this pass
    (ConfigError otherwise).

    Outputs are cloned inside the hook, before any later in-place op can change them.
    ``pool="gap"`` averages (B, C, H, W) outputs over H and W (never the input image).
    Without ``grad`` the forward runs under ``torch.no_grad()``.
    """
    if pool not in POOLS:
        raise ConfigError(f"layers.pool = {pool!r}: valid values are {', '.join(POOLS)}")
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n != INPUT and n not in modules]
    if unknown:
        raise ConfigError(f"unknown layer {unknown[0]!r}; {closest(unknown[0], tap_names(model))}")
    acts: dict[str, torch.Tensor] = {}
    aliases = dict(aliases or {})
    keys: dict[str, tuple] = {}
    watched = set(aliases) | set(aliases.values())

    def hook(name):
        def fn(_m, _inp, out):
            out = _first_tensor(out)
            if name in watched:
                keys[name] = tensor_key(out)
            if name not in aliases:
                acts[name] = _flatten(out.clone(), pool)

        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers if n != INPUT]
    try:
        with torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    for alias, layer in aliases.items():
        if alias in keys and keys[alias] != keys.get(layer):
            raise ConfigError(
                f"layer {alias!r} was stored as an alias of {layer!r} (the same tensor), but in "
                "this forward pass it is not: the model changed; rerun with --overwrite"
            )
    out = {}
    for name in layers:  # in the caller's order
        if name in aliases:
            continue
        if name == INPUT:
            out[name] = (
                x.detach().reshape(len(x), -1).clone() if not grad else x.reshape(len(x), -1)
            )
        elif name in acts:
            out[name] = acts[name]
        else:
            raise ConfigError(f"layer {name!r} did not run during the forward pass")
    return logits, out


def _flatten(t: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "gap" and t.ndim == 4:
        return t.mean(dim=(2, 3))
    return t.reshape(len(t), -1)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot tap a module whose output is {type(out).__name__}")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
