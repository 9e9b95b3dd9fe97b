"""Conv-4, the four-block backbone of Prototypical Networks (Snell et al., 2017), for CPU-sized runs.

Four blocks of 3x3 conv (64 channels, with bias) + BN + ReLU + MaxPool(2), then the average of the last map:
a 64-d feature. It is not part of the TasNet release; the embedded demo uses it because ResNet-12 trains at a
few images per second on a 2-core CPU.

``input_size`` below 84 first average-pools the 84x84 input by ``84 // input_size`` (an exact box filter,
i.e. antialiased downsampling), so the data, the transforms and the checkpoints stay those of the 84x84
pipeline while the convolutions run on a 42x42 or 28x28 image: the first block, whose 64 full-resolution
channels are the most expensive part of the network, then costs 4 or 9 times less.

    input 84 -> blocks 42, 21, 10, 5   (the classic Conv-4; fixed pool 5)
    input 42 -> blocks 21, 10, 5, 2    (fixed pool 2)
    input 28 -> blocks 14, 7, 3, 1     (fixed pool 1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.pooling import FeaturePool

FULL_SIZE = 84


def conv_block(in_channels: int, channels: int) -> nn.Sequential:
    """3x3 conv + BN + ReLU + MaxPool(2): (B, C_in, H, W) -> (B, C, H // 2, W // 2)."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.MaxPool2d(2))


class Conv4(nn.Module):
    """Conv-4: (B, 3, 84, 84) images -> (B, 64) features.

    Args:
        pool: ``"fixed"`` averages the last map with a window fitted to an 84x84 input (see the module
            docstring) and refuses other sizes; ``"adaptive"`` averages whatever map arrives.
        input_size: side the 84x84 input is average-pooled to before the first block; 84 divided by it must
            be a whole number (84, 42, 28, 21, ...).
        width: channels of every block.
    """

    out_dim = 64

    def __init__(self, pool: str = "fixed", input_size: int = FULL_SIZE, width: int = 64):
        super().__init__()
        if input_size < 16 or FULL_SIZE % input_size:
            raise ValueError(f"input_size must divide {FULL_SIZE} and be at least 16, got {input_size}")
        self.input_stride = FULL_SIZE // input_size
        self.out_dim = width
        self.layer1 = conv_block(3, width)
        self.layer2 = conv_block(width, width)
        self.layer3 = conv_block(width, width)
        self.layer4 = conv_block(width, width)
        last_map = input_size
        for _ in range(4):
            last_map //= 2
        self.pool = FeaturePool(pool, fixed_size=last_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width); H = W = 84 for the fixed pool."""
        if self.input_stride > 1:
            x = F.avg_pool2d(x, self.input_stride)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.pool(x)

    def extra_repr(self) -> str:
        return f"input_stride={self.input_stride}"
