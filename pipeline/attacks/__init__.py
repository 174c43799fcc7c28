"""Adversarial attacks behind a small registry: APGD (CE, DLR, targeted DLR) and foolbox's.

``get_attack(name, norm, eps, ...)`` returns a callable ``attack(model, x, y, *, seed=None)
-> AttackResult``. Names: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (advlens' own APGD, see
:mod:`advlens.attacks.apgd`) and ``foolbox:<ClassName>`` (any Lp-bounded foolbox attack, see
:mod:`advlens.attacks.foolbox_attacks`). Every attack

- attacks only the inputs the model classifies correctly; the others come back unchanged with
  ``success = False``;
- returns for every attacked input a real perturbed twin (the best point the attack found),
  inside the eps-ball of ``norm`` and inside [0, 1];
- draws its randomness from a generator seeded by ``seed`` (per call: ``seed=``), so the same
  inputs and seed give bit-identical outputs on the CPU;
- with ``sub_batch`` set, runs its forward and backward passes on at most that many images at a
  time (memory bounded by the sub-batch, not the batch). APGD draws its random starts for the
  whole batch first, so the random streams do not change (docs/design.md, "Extraction memory").

A model left in training mode is switched to eval mode, with a warning through ``logging``
(``warnings`` would turn into errors under the test suite's ``filterwarnings = error``).
"""

from __future__ import annotations

import re
from typing import Any

from advlens.attacks.base import (
    APGD_LOSSES,
    FLOAT16_MAX,
    FOOLBOX_PREFIX,
    NORMS,
    Attack,
    AttackFactory,
    AttackResult,
    check_eps,
    check_finite,
    check_norm,
    check_seed,
    check_sub_batch,
    chunks,
    enforce_constraints,
    lp_norm,
    model_device,
)
from advlens.attacks.unperturbed import Unperturbed
from advlens.errors import ConfigError
from advlens.registry import Registry

# name -> factory; implementations are imported on first use (foolbox only when named)
ATTACKS: Registry[AttackFactory] = Registry("attack", setting="attack.name")
for _name in APGD_LOSSES:
    ATTACKS.register(_name, "advlens.attacks.apgd:build")
ATTACKS.register_pattern(
    re.escape(FOOLBOX_PREFIX) + ".*",
    "advlens.attacks.foolbox_attacks:build",
    shown=FOOLBOX_PREFIX + "<ClassName>",
    names="advlens.attacks.foolbox_attacks:prefixed_names",
)


def list_attacks() -> list[str]:
    """Valid attack names: the APGD family and ``foolbox:<ClassName>`` for foolbox's attacks."""
    return sorted(ATTACKS.names()) + [n for n in ATTACKS.all_names() if n not in ATTACKS.names()]


def get_attack(
    name: str,
    norm: str,
    eps: float,
    *,
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    **kw: Any,
) -> Attack:
    """Build the attack ``name`` for ``norm`` and radius ``eps``.

    Parameters
    ----------
    name : ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` or ``foolbox:<ClassName>``.
    norm : ``linf``, ``l2`` or ``l1``.
    eps : radius of the perturbation ball, finite and > 0.
    n_iter, n_restarts, rho, seed : APGD's settings (Croce & Hein 2020); foolbox attacks take
        ``n_iter`` as their ``steps`` when they have such a parameter.
    **kw : ``autocast_bf16`` (bf16 autocast of the forward passes), ``channels_last`` (inputs
        and, in place, the model's parameters), ``sub_batch`` (images per forward/backward
        pass), ``n_target_classes`` (apgd-t, default 9);
        other keywords go to the foolbox attack's constructor.
    """
    norm = check_norm(norm)
    eps = check_eps(eps)
    if not isinstance(name, str):
        raise ConfigError(f"attack name {name!r} must be a string")
    for key, value, low in (("n_iter", n_iter, 1), ("n_restarts", n_restarts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"attack {key} = {value!r}: must be an integer >= {low}")
    if not (isinstance(rho, int | float) and 0.0 < rho <= 1.0):
        raise ConfigError(f"attack rho = {rho!r}: must be a number in (0, 1]")
    common = {
        "seed": seed,
        "autocast_bf16": bool(kw.pop("autocast_bf16", False)),
        "channels_last": bool(kw.pop("channels_last", False)),
        "sub_batch": check_sub_batch(kw.pop("sub_batch", None)),
    }
    key = name.lower() if name.lower() in ATTACKS.names() else name
    factory = ATTACKS.get(key)
    return factory(
        key, norm, eps, n_iter=n_iter, n_restarts=n_restarts, rho=float(rho), common=common,
        kwargs=kw,
    )  # fmt: skip


__all__ = [
    "ATTACKS",
    "FLOAT16_MAX",
    "NORMS",
    "AttackFactory",
    "check_finite",
    "check_seed",
    "check_sub_batch",
    "chunks",
    "model_device",
    "Unperturbed",
    "Attack",
    "AttackResult",
    "check_eps",
    "check_norm",
    "enforce_constraints",
    "get_attack",
    "list_attacks",
    "lp_norm",
]
