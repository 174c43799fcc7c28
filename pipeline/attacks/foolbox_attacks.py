"""foolbox's attacks by name: ``foolbox:<ClassName>`` (``foolbox:LinfPGD``, ``foolbox:FGSM``,
``foolbox:L2CarliniWagnerAttack``, ``foolbox:L2DeepFoolAttack``, ...).

The model is wrapped in ``foolbox.PyTorchModel(model, bounds=(0, 1))`` and attacked with
``epsilons=eps``; foolbox's clipped output (inside the eps-ball) is the perturbed twin, and
advlens computes the norm and predictions itself. The attack's distance must match ``norm``
(foolbox attacks that take any distance get the one of ``norm``). foolbox draws random
starts from torch's global generator: advlens seeds it inside ``torch.random.fork_rng`` so
the caller's random state is untouched and reruns are identical.

This module is not called ``foolbox.py`` so that it cannot shadow the foolbox package.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

import torch

from advlens._optional import has, require
from advlens.attacks.base import FOOLBOX_PREFIX, Attack
from advlens.errors import ConfigError, closest

log = logging.getLogger(__name__)
_P_TO_NORM = {float("inf"): "linf", 2.0: "l2", 1.0: "l1"}


def import_foolbox() -> ModuleType:
    """Import foolbox, silencing the DeprecationWarning its import triggers (scipy.ndimage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return require("foolbox", "foolbox attacks")


@cache
def foolbox_attack_names() -> tuple[str, ...]:
    """Names of foolbox's concrete attack classes (empty when foolbox is not installed)."""
    if not has("eagerpy"):
        return ()
    try:
        fb = import_foolbox()
    except ImportError:
        return ()
    base = fb.attacks.base.Attack
    return tuple(
        sorted(
            n
            for n, c in vars(fb.attacks).items()
            if inspect.isclass(c) and issubclass(c, base) and not inspect.isabstract(c)
        )
    )


class _FloatLogits(torch.nn.Module):
    """The model under the attack's autocast setting, returning float32 logits."""

    def __init__(self, model: torch.nn.Module, attack: Attack):
        super().__init__()
        self.model = model
        self.attack = attack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attack.logits(self.model, x)


@dataclass(frozen=True)
class FoolboxAttack(Attack):
    """A foolbox attack class with its constructor keywords."""

    class_name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    def build(self) -> Any:
        """A fresh instance of the foolbox attack (they keep no state, but stay safe)."""
        return _instantiate(self.class_name, self.norm, self.kwargs)

    def _perturb(self, model, x, y, seed: int) -> torch.Tensor:
        fb = import_foolbox()
        wrapped = _FloatLogits(model, self).eval()
        fmodel = fb.PyTorchModel(wrapped, bounds=(0.0, 1.0), device=x.device)
        attack = self.build()
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.manual_seed(seed % 2**64)
            _, clipped, _ = attack(fmodel, x.contiguous(), y, epsilons=self.eps)
        same = (clipped == x).flatten(1).all(1).sum().item()
        if same:  # say so: the contract promises a perturbed twin, foolbox may not give one
            log.warning(
                "attack %s returned the clean input for %d of %d attacked samples",
                self.name,
                same,
                len(x),
            )
        return clipped.detach()


def _instantiate(class_name: str, norm: str, kwargs: dict[str, Any]) -> Any:
    fb = import_foolbox()
    cls = getattr(fb.attacks, class_name, None)
    names = foolbox_attack_names()
    if class_name not in names or cls is None:
        raise ConfigError(
            f"unknown foolbox attack {FOOLBOX_PREFIX + class_name!r}; "
            f"{closest(class_name, names)} (use foolbox:<ClassName>)"
        )
    kwargs = dict(kwargs)
    params = inspect.signature(cls).parameters
    if "distance" in params and "distance" not in kwargs:
        kwargs["distance"] = getattr(fb.distances, norm)
    try:
        attack = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"attack {FOOLBOX_PREFIX + class_name!r}: bad settings {kwargs!r}: {exc}; it takes "
            f"{', '.join(params) or 'no settings'}"
        ) from None
    p = getattr(getattr(attack, "distance", None), "p", None)
    if p is None or float(p) not in _P_TO_NORM:
        raise ConfigError(
            f"attack {FOOLBOX_PREFIX + class_name!r} is not bounded in an L1, L2 or Linf norm; "
            "advlens needs an eps-ball attack"
        )
    if _P_TO_NORM[float(p)] != norm:
        raise ConfigError(
            f"attack {FOOLBOX_PREFIX + class_name!r} works in the {_P_TO_NORM[float(p)]} norm, "
            f"not {norm}; pick a foolbox attack of the {norm} norm (e.g. foolbox:"
            f"{ {'linf': 'LinfPGD', 'l2': 'L2PGD', 'l1': 'L1PGD'}[norm] })"
        )
    return attack


def make_foolbox_attack(
    name: str, norm: str, eps: float, *, n_iter: int, common: dict[str, Any], kwargs: dict[str, Any]
) -> FoolboxAttack:
    """``foolbox:<ClassName>`` as an advlens attack; ``n_iter`` becomes ``steps`` if taken."""
    class_name = name[len(FOOLBOX_PREFIX) :]
    kwargs = dict(kwargs)
    fb = import_foolbox()
    cls = getattr(fb.attacks, class_name, None)
    if cls is not None and "steps" in inspect.signature(cls).parameters:
        kwargs.setdefault("steps", n_iter)
    _instantiate(class_name, norm, kwargs)  # validate now, not in the middle of a run
    return FoolboxAttack(
        name=name, norm=norm, eps=eps, class_name=class_name, kwargs=kwargs, **common
    )


def prefixed_names() -> list[str]:
    """``foolbox:<ClassName>`` for every foolbox attack class (the registry's listing)."""
    return [FOOLBOX_PREFIX + n for n in foolbox_attack_names()]


def build(
    name: str, norm: str, eps: float, *, n_iter: int, n_restarts: int, rho: float,
    common: dict[str, Any], kwargs: dict[str, Any],
) -> FoolboxAttack:  # fmt: skip
    """``foolbox:<ClassName>`` (an :class:`~advlens.attacks.base.AttackFactory`); APGD's
    ``n_restarts`` and ``rho`` do not apply."""
    return make_foolbox_attack(name, norm, eps, n_iter=n_iter, common=common, kwargs=kwargs)
