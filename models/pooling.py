"""The final pooling of the backbones: the original's fixed window, or an explicit adaptive choice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeaturePool(nn.Module):
    """Average the last feature map (B, C, h, w) into (B, C).

    ``mode="fixed"`` reproduces the original: an average pool with a fixed window (5 for ResNet-12, 21 for
    WRN-28-10), which only yields one value per channel at 84x84. Rather than silently returning a wrong-sized
    feature for other inputs, it raises and points to ``mode="adaptive"`` (global average pooling), which
    equals the fixed pool at 84x84 and also works for any other size.
    """

    def __init__(self, mode: str, fixed_size: int):
        super().__init__()
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"pool must be 'fixed' or 'adaptive', got {mode!r}")
        self.mode = mode
        self.fixed_size = fixed_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C)"""
        if self.mode == "adaptive":
            return x.mean(dim=(2, 3))
        if x.shape[-2:] != (self.fixed_size, self.fixed_size):
            raise ValueError(
                f"the fixed pool expects a {self.fixed_size}x{self.fixed_size} feature map (84x84 input), got "
                f"{tuple(x.shape[-2:])}; build the backbone with pool='adaptive' for other input sizes")
        return F.avg_pool2d(x, self.fixed_size).flatten(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, fixed_size={self.fixed_size}"
