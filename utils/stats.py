"""Few-shot evaluation statistics."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_ci95(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width, ``1.96 * std / sqrt(n)`` (population std, as the field reports)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0:
        raise ValueError("mean_ci95: no accuracies given")
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.size))
