"""Backbones and TasNet heads."""
from __future__ import annotations

from torch import nn

from models.resnet12 import ResNet12
from models.wrn28 import WRN28

BACKBONES = {"res12": ResNet12, "wrn28": WRN28}


def build_backbone(name: str, pool: str = "fixed", **kwargs) -> nn.Module:
    """Build a backbone by name (``res12`` or ``wrn28``): (B, 3, 84, 84) images -> (B, 640) features.

    Args:
        pool: ``"fixed"`` (the original pooling, 84x84 inputs) or ``"adaptive"`` (any input size).
        kwargs: passed to the backbone (e.g. ``dropout`` for ``wrn28``).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](pool=pool, **kwargs)
