"""ResNet-12 backbone, with the state-dict keys of the original TasNet / MTL release.

Four residual blocks of widths 64-160-320-640; each halves the resolution with MaxPool(2), so an 84x84 image
ends as a 5x5 map that the original averages with a fixed AvgPool(5) into a 640-d feature.
"""
from __future__ import annotations

import torch
from torch import nn

from models.pooling import FeaturePool


class BasicBlock(nn.Module):
    """Three 3x3 conv+BN (LeakyReLU 0.1 after the first two), a 1x1 conv+BN shortcut, LeakyReLU, MaxPool(2)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.relu = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C, H // 2, W // 2)"""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.maxpool(self.relu(out + self.downsample(x)))


class ResNet12(nn.Module):
    """ResNet-12: (B, 3, 84, 84) images -> (B, 640) features.

    Args:
        pool: ``"fixed"`` is the original AvgPool(5), which gives 640-d features only for 84x84 inputs (the
            map is then 5x5). ``"adaptive"`` averages whatever map size arrives, so other input sizes work
            too (e.g. 32x32 CIFAR without upsampling); at 84x84 both give identical features.
    """

    out_dim = 640

    def __init__(self, pool: str = "fixed"):
        super().__init__()
        widths = (64, 160, 320, 640)
        in_channels = 3
        for i, width in enumerate(widths, start=1):
            # nn.Sequential of one block keeps the original keys `layer{i}.0.*`.
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(in_channels, width)))
            in_channels = width
        self.pool = FeaturePool(pool, fixed_size=5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 640)"""
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.pool(x)
