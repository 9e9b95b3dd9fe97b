"""WRN-28-10 backbone, with the state-dict keys of the original TasNet release.

A 3x3 stem (3 -> 16) then three stages of four pre-activation ``wide_basic`` blocks of widths 160/320/640 with
strides 1/2/2, a final BN + ReLU, and the original's avg_pool2d(21): 84x84 -> 84 -> 42 -> 21 -> 640-d.
Initialisation: PyTorch's defaults for every layer, as in the release.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.pooling import FeaturePool


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3(stride) plus a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, channels: int, dropout: float, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H / stride, W / stride)"""
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WRN28(nn.Module):
    """WRN-28-10: (B, 3, 84, 84) images -> (B, 640) features.

    Args:
        dropout: dropout rate inside each block (0.5 in the original).
        pool: ``"fixed"`` is the original avg_pool2d(21), valid for 84x84 inputs only; ``"adaptive"`` is global
            average pooling, identical at 84x84 and usable at any input size.
    """

    out_dim = 640

    def __init__(self, dropout: float = 0.5, pool: str = "fixed", depth: int = 28, widen_factor: int = 10):
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        in_channels = 16
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(WideBasic(in_channels, width, dropout, stride if j == 0 else 1))
                in_channels = width
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=0.9)
        self.pool = FeaturePool(pool, fixed_size=21)
        # No custom initialisation on purpose: the release defines a Xavier ``conv_init`` for its WRN but never
        # applies it, so its WRN-28-10 starts from PyTorch's default layer initialisation, as this one does.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 640)"""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.pool(F.relu(self.bn1(x)))
