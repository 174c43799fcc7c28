"""APGD (Croce & Hein, ICML 2020) with the CE, DLR and targeted DLR losses; Linf, L2 and L1.

Follows the authors' reference code (auto-attack, ``autopgd_base.py``):

- step size 2*eps (L1: eps), momentum 0.75 (none for L1, as in the reference);
- checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of n_iter
  (L1: every 4% of n_iter, as in the reference);
- at a checkpoint the step size halves where (1) fewer than a fraction rho of the steps since
  the last checkpoint raised the loss, or (2) the step size was not reduced at the last
  checkpoint and the best loss has not improved since; those samples restart from their best
  point (and its gradient);
- L1 takes the sparse steps of "Mind the box" (Croce & Hein 2021) with an adaptive sparsity.

Differences from the reference, all deliberate: the loss history starts with the loss of the
starting point (the reference compares the first step with a zero-initialised row); condition
(1) is the paper's strict "< rho"; the returned twin of a sample that was never misclassified
is its best-loss iterate (the reference returns the clean input), and of a misclassified one
the highest-loss misclassified iterate. Everything stays on the device; the per-iteration
bookkeeping uses masks (``torch.where``), not indexing, so a GPU never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from advlens.attacks.base import APGD_LOSSES, Attack, chunks
from advlens.errors import ConfigError


def checkpoints(n_iter: int) -> list[int]:
    """Iteration counts at which APGD checks its step size (Linf and L2)."""
    k = max(int(0.22 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    out, at = [], 0
    while at + k <= n_iter:
        at += k
        out.append(at)
        k = max(k - size_decr, k_min)
    return out


def halve_step(
    window: torch.Tensor,
    rho: float,
    reduced_last: torch.Tensor,
    best_last: torch.Tensor,
    best_now: torch.Tensor,
) -> torch.Tensor:
    """Which samples halve their step at a checkpoint (bool (B,)).

    ``window``: (k + 1, B) losses from the last checkpoint's iterate to the current one.
    Condition 1: fewer than ``rho * k`` of the k steps raised the loss. Condition 2: the step
    was not halved at the last checkpoint and the best loss did not improve since.
    """
    k = window.shape[0] - 1
    ups = (window[1:] > window[:-1]).sum(0)
    return (ups < rho * k) | (~reduced_last & (best_last >= best_now))


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    z_sorted = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def project_l1_box(
    x: torch.Tensor, y: torch.Tensor, eps: float, n_bisect: int = 40
) -> torch.Tensor:
    """Euclidean projection of the point ``y`` onto {z in [0, 1]: ||z - x||_1 <= eps}.

    The solution is d(lam) = clip(soft_threshold(y - x, lam), -x, 1 - x) for the smallest
    lam >= 0 with ||d||_1 <= eps (KKT); lam is found by bisection and its upper end kept, so
    the result is always feasible.
    """
    b = x.shape[0]
    xf = x.reshape(b, -1)
    v = (y - x).reshape(b, -1)
    lo_box, hi_box = -xf, 1.0 - xf

    def d_of(lam: torch.Tensor) -> torch.Tensor:
        shrunk = v.sign() * (v.abs() - lam[:, None]).clamp_min(0.0)
        return torch.minimum(torch.maximum(shrunk, lo_box), hi_box)

    zero = v.new_zeros(b)
    lo, hi = zero, v.abs().amax(dim=1) if v.shape[1] else zero
    need = d_of(zero).abs().sum(dim=1) > eps
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        over = d_of(mid).abs().sum(dim=1) > eps
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    d = d_of(torch.where(need, hi, zero))
    return (xf + d).reshape(x.shape)


@dataclass(frozen=True)
class APGD(Attack):
    """APGD with ``loss`` in ce, dlr, dlr-targeted (apgd-t, over ``n_target_classes``)."""

    loss: str = "ce"
    n_iter: int = 100
    n_restarts: int = 1
    rho: float = 0.75
    n_target_classes: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("ce", "dlr", "dlr-targeted"):
            raise ConfigError(f"APGD loss {self.loss!r}: use ce, dlr or dlr-targeted")
        n = self.n_target_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"apgd-t n_target_classes = {n!r}: must be an integer >= 1")

    @property
    def min_classes(self) -> int:
        # DLR divides by z_pi1 - z_pi3; its targeted form also needs z_pi4.
        return {"ce": 2, "dlr": 3, "dlr-targeted": 4}[self.loss]

    # ------------------------------------------------------------------ driver
    def _perturb(self, model, x, y, seed: int) -> torch.Tensor:
        with torch.no_grad():
            clean_logits = self.logits(model, x)
        n_classes = clean_logits.shape[1]
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed % 2**64)  # any Python int; torch wants [0, 2**64)
        best_x = x.clone()
        best_loss = torch.full_like(y, float("-inf"), dtype=torch.float32)
        fooled = torch.zeros_like(y, dtype=torch.bool)
        targets: list[torch.Tensor | None] = [None]  # untargeted: one run without a target
        if self.loss == "dlr-targeted":
            order = clean_logits.argsort(dim=1)
            targets = [
                order[:, -k] for k in range(2, min(self.n_target_classes, n_classes - 1) + 2)
            ]
        for target in targets:
            for _ in range(self.n_restarts):
                # Only samples that are still robust are attacked again (as the reference).
                idx = (~fooled).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best_x
                tgt = None if target is None else target[idx]
                x_run, fooled_run, loss_run = self._run_chunks(model, x[idx], y[idx], tgt, gen)
                take = fooled_run | (loss_run > best_loss[idx])
                best_x[idx] = torch.where(take.view(-1, *[1] * (x.dim() - 1)), x_run, best_x[idx])
                best_loss[idx] = torch.where(take, loss_run, best_loss[idx])
                fooled[idx] = fooled_run
        return best_x

    # ------------------------------------------------------------------ pieces
    def _loss_grad(self, model, x_adv, y, target):
        """Per-sample loss, logits and the gradient of the summed loss w.r.t. the input."""
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.logits(model, x_adv)
            if self.loss == "ce":
                loss = F.cross_entropy(logits, y, reduction="none")
            elif self.loss == "dlr":
                loss = dlr_loss(logits, y)
            else:
                loss = dlr_targeted_loss(logits, y, target)
            (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
        return logits.detach(), loss.detach(), grad.detach()

    def _project(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        eps = self.eps
        if self.norm == "linf":
            return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)
        if self.norm == "l2":
            # As the reference: onto the ball, then clipped to the box (stays in the ball).
            delta = z - x
            size = _flat_norm(delta, 2)
            return (x + delta * (eps / (size + 1e-12)).clamp(max=1.0)).clamp(0.0, 1.0)
        return project_l1_box(x, z, eps)

    def _init(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        shape = x.shape
        if self.norm == "linf":
            t = 2 * torch.rand(shape, generator=gen, device=x.device) - 1
            t = t.contiguous(memory_format=_fmt(x))
            x_adv = x + self.eps * t / (_flat_norm(t, float("inf")) + 1e-12)
        else:
            t = torch.randn(shape, generator=gen, device=x.device).contiguous(memory_format=_fmt(x))
            if self.norm == "l2":
                x_adv = x + self.eps * t / (_flat_norm(t, 2) + 1e-12)
            else:
                return project_l1_box(x, x + t, self.eps)
        return x_adv.clamp(0.0, 1.0)

    def _run_chunks(self, model, x, y, target, gen):
        """One APGD run over the batch, ``sub_batch`` samples at a time.

        The random starts of the whole batch are drawn first, in one call, exactly as without
        sub-batches; every later step of a sample depends on that sample alone.
        """
        x_init = self._init(x, gen)
        parts = [
            self._single_run(model, x[s], y[s], None if target is None else target[s], x_init[s])
            for s in chunks(len(x), self.sub_batch)
        ]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    def _single_run(self, model, x, y, target, x_adv):
        """One APGD run from the start ``x_adv``; returns (twin, fooled, loss of the twin)."""
        n_iter, eps, b = self.n_iter, self.eps, x.shape[0]
        bshape = (b,) + (1,) * (x.dim() - 1)
        l1 = self.norm == "l1"
        logits, loss, grad = self._loss_grad(model, x_adv, y, target)
        fooled = logits.argmax(1) != y
        neg_inf = torch.full_like(loss, float("-inf"))
        loss_best_adv = torch.where(fooled, loss, neg_inf)
        x_best_adv = x_adv.clone()
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        alpha = 1.0 if l1 else 2.0
        step = torch.full(bshape, alpha * eps, device=x.device)
        x_old = x_adv.clone()
        history = torch.empty(n_iter + 1, b, device=x.device)
        history[0] = loss
        checks = set(range(max(int(0.04 * n_iter), 1), n_iter + 1, max(int(0.04 * n_iter), 1)))
        checks = checks if l1 else set(checkpoints(n_iter))
        last_check = 0
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones_like(fooled)
        n_fts = x[0].numel()
        topk = torch.full((b,), 0.2, device=x.device)
        sp_old = torch.full((b,), float(n_fts), device=x.device)
        for i in range(n_iter):
            with torch.no_grad():
                if l1:
                    x_adv = self._l1_step(x, x_adv, grad, step, topk)
                else:
                    momentum = x_adv - x_old
                    x_old = x_adv
                    a = 0.75 if i > 0 else 1.0
                    direction = grad.sign() if self.norm == "linf" else _normalize(grad)
                    z = self._project(x, x_adv + step * direction)
                    x_adv = self._project(x, x_adv + (z - x_adv) * a + momentum * (1 - a))
            logits, loss, grad = self._loss_grad(model, x_adv, y, target)
            with torch.no_grad():
                wrong = logits.argmax(1) != y
                fooled = fooled | wrong
                better_adv = wrong & (loss > loss_best_adv)
                x_best_adv = torch.where(better_adv.view(bshape), x_adv, x_best_adv)
                loss_best_adv = torch.where(better_adv, loss, loss_best_adv)
                history[i + 1] = loss
                better = loss > loss_best
                x_best = torch.where(better.view(bshape), x_adv, x_best)
                grad_best = torch.where(better.view(bshape), grad, grad_best)
                loss_best = torch.where(better, loss, loss_best)
                if i + 1 not in checks:
                    continue
                if l1:
                    sp_curr = (x_best != x).reshape(b, -1).sum(1).float()
                    reset = sp_curr / sp_old < 0.95
                    topk = sp_curr / n_fts / 1.5
                    step = torch.where(reset.view(bshape), alpha * eps, step / 1.5)
                    step = step.clamp(alpha * eps / 10.0, alpha * eps)
                    sp_old = sp_curr
                else:
                    window = history[last_check : i + 2]
                    reset = halve_step(window, self.rho, reduced_last, loss_best_last, loss_best)
                    reduced_last = reset
                    loss_best_last = loss_best.clone()
                    step = torch.where(reset.view(bshape), step / 2.0, step)
                    last_check = i + 1
                x_adv = torch.where(reset.view(bshape), x_best, x_adv)
                grad = torch.where(reset.view(bshape), grad_best, grad)
        twin = torch.where(fooled.view(bshape), x_best_adv, x_best)
        return twin, fooled, torch.where(fooled, loss_best_adv, loss_best)

    def _l1_step(self, x, x_adv, grad, step, topk):
        """Sparse L1 step of APGD-L1: the top-k gradient coordinates, sign, equal share."""
        b = x.shape[0]
        g = grad.reshape(b, -1)
        n_fts = g.shape[1]
        g_sorted = g.abs().sort(dim=1)[0]
        k_idx = ((1.0 - topk) * n_fts).clamp(0, n_fts - 1).long()
        thr = g_sorted.gather(1, k_idx[:, None])
        sparse = (g * (g.abs() >= thr)).sign()
        count = sparse.abs().sum(dim=1, keepdim=True) + 1e-10
        z = x_adv + step * (sparse / count).reshape(x.shape)
        return project_l1_box(x, z, self.eps)


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    size = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), ord=p, dim=1)
    return size.view(-1, *[1] * (t.dim() - 1))


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / (_flat_norm(t, 2) + 1e-12)


def build(
    name: str, norm: str, eps: float, *, n_iter: int, n_restarts: int, rho: float,
    common: dict[str, Any], kwargs: dict[str, Any],
) -> APGD:  # fmt: skip
    """``apgd-ce``, ``apgd-dlr`` or ``apgd-t`` (an :class:`~advlens.attacks.base.AttackFactory`)."""
    allowed = {"n_target_classes"} if name == "apgd-t" else set()
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise ConfigError(
            f"attack {name!r} does not take {', '.join(extra)}; it takes n_iter, n_restarts, "
            f"rho, seed, autocast_bf16, channels_last{', n_target_classes' if allowed else ''}"
        )
    return APGD(
        name=name, norm=norm, eps=eps, loss=APGD_LOSSES[name], n_iter=n_iter,
        n_restarts=n_restarts, rho=float(rho), **common, **kwargs,
    )  # fmt: skip
