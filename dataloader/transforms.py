"""Input normalisation per backbone: the statistics the original backbones were trained with."""
from __future__ import annotations

# ResNet-12 uses miniImageNet's own pixel statistics; WRN-28-10 the ImageNet ones.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "res12": (tuple(v / 255.0 for v in (120.39586422, 115.59361427, 104.54012653)),
              tuple(v / 255.0 for v in (70.68188272, 68.27635443, 72.54505529))),
    "wrn28": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Conv-4 (not in the original release; the demo's backbone): the ImageNet statistics, as a generic choice
    "conv4": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "conv4_28": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization(model_type: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel, in [0, 1] units, for the backbone ``model_type``."""
    if model_type not in NORMALIZATION:
        raise ValueError(f"no normalisation known for backbone {model_type!r}; choose from {sorted(NORMALIZATION)}")
    return NORMALIZATION[model_type]
