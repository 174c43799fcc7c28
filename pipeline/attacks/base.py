"""The attack family's interface: :class:`Attack`, :class:`AttackResult` and the checks every
attack shares (norms, eps, seeds, the eps-ball constraint).

Implementations, one module each: :mod:`~advlens.attacks.apgd`,
:mod:`~advlens.attacks.foolbox_attacks`, :mod:`~advlens.attacks.unperturbed`. Each provides
an :class:`AttackFactory` registered in :data:`advlens.attacks.ATTACKS`.
"""

from __future__ import annotations

import logging
import math
import operator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from advlens.config import NORMS
from advlens.errors import ConfigError, DataError

log = logging.getLogger(__name__)

APGD_LOSSES = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}  # name -> loss
FOOLBOX_PREFIX = "foolbox:"  # foolbox:<ClassName> names any of foolbox's attacks


@dataclass(frozen=True)
class AttackResult:
    """Outcome for a batch of B inputs (torch tensors on the model's device).

    x_adv: (B, C, H, W) perturbed twins in [0, 1] inside the eps-ball; success: bool (B,);
    norm: float32 (B,) perturbation size in the attack's norm; pred_clean, pred_adv: int64 (B,).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    norm: torch.Tensor
    pred_clean: torch.Tensor
    pred_adv: torch.Tensor

    def __post_init__(self) -> None:
        b = self.x_adv.shape[0] if self.x_adv.dim() > 0 else -1
        expect = {
            "success": torch.bool,
            "norm": torch.float32,
            "pred_clean": torch.int64,
            "pred_adv": torch.int64,
        }
        for key, dtype in expect.items():
            value = getattr(self, key)
            if tuple(value.shape) != (b,) or value.dtype != dtype:
                raise ValueError(
                    f"AttackResult.{key}: expected shape ({b},) {dtype}, "
                    f"got {tuple(value.shape)} {value.dtype}"
                )


def check_norm(norm: str) -> str:
    """Normalise ``norm`` (``Linf``, ``L2``, ``l1``, ...) or raise ConfigError."""
    key = str(norm).lower()
    if key not in NORMS:
        raise ConfigError(f"unknown attack norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return key


def check_eps(eps: Any) -> float:
    """``eps`` as a float, or ConfigError when it is not a finite number > 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ConfigError(f"attack eps = {eps!r}: must be a finite number > 0") from None
    if isinstance(eps, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"attack eps = {eps!r}: must be a finite number > 0 (e.g. linf 0.1, l2 1.5 for "
            "Fashion-MNIST); eps = 0 means no attack at all"
        )
    return value


def check_seed(seed: Any) -> int:
    """``seed`` as a Python int (numpy integers welcome), or ConfigError."""
    if isinstance(seed, bool):
        raise ConfigError(f"attack seed = {seed!r}: must be an integer")
    try:
        return int(operator.index(seed))
    except TypeError:
        raise ConfigError(f"attack seed = {seed!r}: must be an integer") from None


FLOAT16_MAX = 65504.0


def check_sub_batch(sub_batch: Any) -> int | None:
    """``sub_batch`` (None, or an integer >= 1), or ConfigError."""
    if sub_batch is None:
        return None
    if isinstance(sub_batch, bool) or not isinstance(sub_batch, int) or sub_batch < 1:
        raise ConfigError(f"attack sub_batch = {sub_batch!r}: must be an integer >= 1 (or None)")
    return sub_batch


def chunks(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)`` (one slice without
    ``size``)."""
    size = int(size) if size else max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


def check_finite(t: torch.Tensor, what: str, *, dtype: str | None = None) -> None:
    """Refuse NaN or infinite values in ``t`` (B, ...), counting the samples that hold them.

    With ``dtype="float16"``, values beyond float16's range (|x| > 65504, which would be
    stored as inf) are refused too, with the hint to store float32.
    """
    if t.numel() == 0:
        return
    flat = t.detach().reshape(len(t), -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        raise ConfigError(
            f"{what} hold NaN or infinite values for {int(bad.sum())} of {len(t)} samples; "
            "the model (or its checkpoint) is broken: check model.checkpoint"
        )
    if dtype == "float16" and flat.numel():
        big = (flat.abs() > FLOAT16_MAX).any(dim=1)
        if bool(big.any()):
            raise ConfigError(
                f"{what} exceed float16's range (|x| > 65504) for {int(big.sum())} of {len(t)} "
                f'samples (largest {float(flat.abs().max()):.4g}); set output.dtype = "float32"'
            )


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``norm`` of ``delta`` (B, ...) as float32 (B,)."""
    flat = delta.flatten(1).float()
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return torch.linalg.vector_norm(flat, ord=2 if norm == "l2" else 1, dim=1)


def enforce_constraints(
    x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float
) -> torch.Tensor:
    """Last line of defence: clip ``x_adv`` to [0, 1] and pull it back into the eps-ball.

    Samples already inside are returned bit for bit; the others move toward ``x`` (a convex
    combination of two points in [0, 1] stays in [0, 1]).
    """
    x_adv = x_adv.clamp(0.0, 1.0)
    delta = x_adv - x
    size = lp_norm(delta, norm)
    outside = size > eps
    shape = (-1,) + (1,) * (x.dim() - 1)
    if norm == "linf":
        fixed = x + delta.clamp(-eps, eps)
    else:
        scale = (eps / size.clamp_min(1e-30)).clamp(max=1.0)
        fixed = x + delta * scale.view(shape).to(delta.dtype)
    return torch.where(outside.view(shape), fixed.clamp(0.0, 1.0), x_adv)


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``fallback`` without any)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return fallback


@dataclass(frozen=True)
class Attack:
    """Common part of every attack: validation, clean predictions, result assembly.

    Subclasses implement ``_perturb(model, x, y, seed) -> x_adv`` for correctly classified
    inputs only.
    """

    name: str
    norm: str
    eps: float
    seed: int = 0
    autocast_bf16: bool = False
    channels_last: bool = False
    sub_batch: int | None = None  # images per forward/backward pass; None: the whole batch

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", check_eps(self.eps))
        object.__setattr__(self, "seed", check_seed(self.seed))
        check_sub_batch(self.sub_batch)

    @property
    def min_classes(self) -> int:
        """Fewest model outputs the attack's loss works with."""
        return 2

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """bf16 autocast context when asked for (a no-op context otherwise)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward pass under the attack's autocast setting; float32 logits."""
        with self.autocast(x.device):
            return model(x).float()

    def __call__(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None
    ) -> AttackResult:
        seed = self.seed if seed is None else check_seed(seed)
        # Attacks need autograd even when the caller runs under no_grad / inference_mode.
        with torch.inference_mode(False), torch.enable_grad():
            model, x, y = self._prepare(model, x, y)
            # Which rows are correct, and which attacks succeed, is decided in float32 without
            # autocast: the pass whose activations extract.py stores. bf16 is for the search.
            with torch.no_grad():
                clean_logits = self.forward_chunks(model, x)
            check_finite(clean_logits, f"attack {self.name}: the clean forward's logits")
            n_classes = clean_logits.shape[1]
            if n_classes < self.min_classes:
                raise ConfigError(
                    f"attack {self.name} needs a model with at least {self.min_classes} classes, "
                    f"this one has {n_classes}; use apgd-ce"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
                raise DataError(
                    f"attack {self.name}: labels must lie in [0, {n_classes - 1}] (the model has "
                    f"{n_classes} outputs), got values in [{int(y.min())}, {int(y.max())}]"
                )
            pred_clean = clean_logits.argmax(dim=1)
            attacked = pred_clean == y
            x_adv = x.clone()
            idx = attacked.nonzero().squeeze(1)
            if idx.numel():
                x_sub = self._perturb(model, x[idx], y[idx], seed)
                x_adv[idx] = enforce_constraints(x[idx], x_sub.to(x.dtype), self.norm, self.eps)
            with torch.no_grad():
                pred_adv = self.forward_chunks(model, x_adv).argmax(dim=1)
            success = attacked & (pred_adv != y)
            return AttackResult(
                x_adv=x_adv.detach(),
                success=success,
                norm=lp_norm(x_adv - x, self.norm),
                pred_clean=pred_clean,
                pred_adv=pred_adv,
            )

    def forward_chunks(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``model(x)``, computed ``sub_batch`` images at a time."""
        if not self.sub_batch or len(x) <= self.sub_batch:
            return model(x).float()
        return torch.cat([model(x[s]).float() for s in chunks(len(x), self.sub_batch)])

    def _prepare(
        self, model: torch.nn.Module, x: Any, y: Any
    ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"attack {self.name}: model must be a torch.nn.Module, got {model!r}")
        if model.training:
            log.warning(
                "attack %s: the model was in training mode; switched it to eval mode "
                "(call model.eval() before attacking)",
                self.name,
            )
            model.eval()
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.dim() < 2 or not x.is_floating_point():
            raise DataError(
                f"attack {self.name}: inputs must be a float tensor (B, C, H, W), "
                f"got {tuple(x.shape)} {x.dtype}"
            )
        if y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(
                f"attack {self.name}: labels must be an integer tensor of shape "
                f"({x.shape[0]},), got {tuple(y.shape)} {y.dtype}"
            )
        device = model_device(model, x.device)
        x = x.detach().to(device=device, dtype=torch.float32).clone()
        y = y.detach().to(device=device, dtype=torch.int64)
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
                raise DataError(
                    f"attack {self.name}: input values lie in [{lo:g}, {hi:g}], outside [0, 1]; "
                    "attacks take images scaled to [0, 1] (normalisation belongs inside the model)"
                )
        if self.channels_last and x.dim() == 4:
            # Module.to takes memory_format at run time; torch's typed overloads leave it out.
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            x = x.contiguous(memory_format=torch.channels_last)
        return model, x, y

    def _perturb(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class AttackFactory(Protocol):
    """``factory(name, norm, eps, *, n_iter, n_restarts, rho, common, kwargs) -> Attack``.

    ``norm`` and ``eps`` are checked already; ``common`` holds the settings every attack takes
    (``seed``, ``autocast_bf16``, ``channels_last``), ``kwargs`` the attack's own.
    """

    def __call__(
        self, name: str, norm: str, eps: float, *, n_iter: int, n_restarts: int, rho: float,
        common: dict[str, Any], kwargs: dict[str, Any],
    ) -> Attack: ...  # fmt: skip
