"""Backbones and TasNet heads."""
from __future__ import annotations

from functools import partial

from torch import nn

from models.conv4 import Conv4
from models.heads import HEADS, METRICS, HeadConfig, TasNet, concat_logits, fusion_logits, refine_prototypes
from models.inner_loop import (INNER_STATES, InnerLoopConfig, fit_regressor, fit_regressors, fit_semantic_regressor,
                               plain_fit_regressor, semantic_queries)
from models.kmeans import batched_kmeans
from models.resnet12 import ResNet12
from models.wrn28 import WRN28

__all__ = ["BACKBONES", "HEADS", "INNER_STATES", "METRICS", "Conv4", "HeadConfig", "InnerLoopConfig", "ResNet12",
           "TasNet", "WRN28", "batched_kmeans", "build_backbone", "concat_logits", "fit_regressor", "fit_regressors",
           "fit_semantic_regressor", "fusion_logits", "plain_fit_regressor", "refine_prototypes", "semantic_queries"]

BACKBONES = {"res12": ResNet12, "wrn28": WRN28, "conv4": Conv4,
             # Conv-4 on the 84x84 input average-pooled to 28x28: the embedded demo's CPU-sized backbone
             "conv4_28": partial(Conv4, input_size=28)}


def build_backbone(name: str, pool: str = "fixed", **kwargs) -> nn.Module:
    """Build a backbone by name (``res12`` or ``wrn28``): (B, 3, 84, 84) images -> (B, 640) features
    (``conv4``, ``conv4_28``: (B, 64), see ``models.conv4``).

    Args:
        pool: ``"fixed"`` (the original pooling, 84x84 inputs) or ``"adaptive"`` (any input size).
        kwargs: passed to the backbone (e.g. ``dropout`` for ``wrn28``).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](pool=pool, **kwargs)
