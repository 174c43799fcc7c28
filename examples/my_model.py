"""An example of your own model for advlens: ``advlens run --set model.name=my_model:build``.

advlens imports ``my_model`` (this file, from the current directory) and calls ``build()``,
with ``num_classes=`` because it accepts that keyword. What the model must do:

- take a float32 batch (N, C, H, W) with values in [0, 1] (normalisation belongs inside the
  model, as in RobustBench), here (N, 1, 28, 28) Fashion-MNIST images;
- return logits of shape (N, num_classes), not probabilities;
- be a ``torch.nn.Module`` whose submodules are the layers to tap (``advlens layers --model
  my_model:build`` lists them: ``features.0``, ``features.1``, ...).

Weights come from ``--set model.checkpoint=weights.pt``, a plain state dict saved with
``torch.save(model.state_dict(), "weights.pt")``. :func:`fit` trains the toy model for the
README's example; your model comes trained.
"""

from __future__ import annotations

import torch
from torch import nn


class MyNet(nn.Module):
    """Two conv blocks and a two-layer head for 1 x 28 x 28 images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(num_classes: int = 10) -> nn.Module:
    """The factory advlens calls for ``model.name = "my_model:build"``."""
    return MyNet(num_classes)


def fit(model: nn.Module, images, labels, *, epochs: int = 2, seed: int = 0) -> nn.Module:
    """Train ``model`` briefly with Adam (a toy stand-in for your own training)."""
    torch.manual_seed(seed)
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
