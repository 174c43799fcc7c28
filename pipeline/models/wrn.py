"""``wrn-28-10``: WideResNet with RobustBench's parameter names (also ``wrn-<depth>-<width>``).

The architecture and parameter names follow RobustBench's ``WideResNet`` (the CIFAR-10
``Standard`` model is WRN-28-10), so its checkpoints load directly (a ``module.`` or
``model.`` prefix is stripped). Inputs are [0, 1] images without normalisation, as in
RobustBench. Taps: conv1, every residual block (``block2.layer.3``), the three groups
(``block1``..``block3``), the final batch-norm + ReLU (``relu``) and the logits (``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advlens.errors import ConfigError
from advlens.models.base import WRN_NAME, ModelRequest, load_checkpoint


class BasicBlock(nn.Module):
    """Pre-activation residual block (bn-relu-conv twice), RobustBench's names and in-place ReLUs."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out)))
            return torch.add(x, self.conv2(out))
        # The shortcut also takes the activated input (as in RobustBench / TRADES).
        x = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(x)))
        assert self.convShortcut is not None  # made when in and out planes differ
        return torch.add(self.convShortcut(x), self.conv2(out))


class NetworkBlock(nn.Module):
    """A group of ``n`` residual blocks (its children live in ``.layer``, as in RobustBench)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 3-channel [0, 1] images."""

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth {depth}: must be 6n + 4 (e.g. 16, 28, 34, 40)")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        groups = [f"block{g}" for g in (1, 2, 3)]
        self.advlens_taps = (
            "conv1",
            *[name for g in groups for name in (*[f"{g}.layer.{i}" for i in range(n)], g)],
            "relu",
            "fc",
        )
        self.advlens_auto = ("conv1", *groups, "relu", "fc")
        for m in self.modules():  # RobustBench's initialisation
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, tuple(out.shape[-2:]))  # avg_pool2d(out, 8) on 32x32 inputs
        return self.fc(out.view(-1, self.nChannels))


def build(request: ModelRequest) -> nn.Module:
    """A WideResNet named ``wrn-<depth>-<width>`` loading ``cfg.checkpoint`` (required)."""
    cfg, n_classes, channels = request.cfg, request.n_classes, request.in_shape[0]
    m = WRN_NAME.match(cfg.name)
    depth, width = (int(m.group(1)), int(m.group(2))) if m else (28, 10)
    if not request.weights:
        return WideResNet(depth, width, n_classes, in_channels=channels)
    if not cfg.checkpoint:
        raise ConfigError(
            f"model.name = {cfg.name!r} needs model.checkpoint: a state dict saved from "
            "RobustBench's WideResNet (e.g. the CIFAR-10 'Standard' model's .pt file)"
        )
    # Parameters on the meta device: no time spent initialising what the checkpoint replaces.
    with torch.device("meta"):
        model = WideResNet(depth, width, n_classes, in_channels=channels)
    # sub_block1 exists in some RobustBench checkpoints but is never used in the forward pass.
    load_checkpoint(model, cfg.checkpoint, ignore=("sub_block1.",))
    return model
