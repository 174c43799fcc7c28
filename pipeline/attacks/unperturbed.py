"""eps = 0: the unperturbed baseline, every twin its clean image (overlap ~ 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advlens.attacks.base import Attack, check_norm, check_seed


@dataclass(frozen=True)
class Unperturbed(Attack):
    """eps = 0: every twin is its clean image. The pipeline's sanity baseline (overlap ~ 1).

    Not reachable through :func:`get_attack`, which refuses eps <= 0; ``advlens run`` uses it
    when a norm's eps is set to exactly 0.
    """

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", 0.0)
        object.__setattr__(self, "seed", check_seed(self.seed))

    def _perturb(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int
    ) -> torch.Tensor:
        return x.clone()
