"""tieredImageNet from the ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` release (84x84 PNGs). The release
has no wnids: labels keep its ``label_specific`` order. Class vectors: GloVe, U(-1, 1) for a class without
any word."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dataloader.prepare.common import (SPLITS, ImageReader, SplitPlan, decode_image, label_classes,
                                       prepare_glove_splits, require_file)
from dataloader.prepare.pickles import load_pickle, pickle_field
from utils import InputError

# The original tieredImageNet preprocessing names these classes by their second synonym.
TIERED_SECOND_SYNONYM = frozenset({"limpkin", "otterhound", "barracouta", "lycaenid"})


def tiered_words(label_str: str) -> list[str]:
    """GloVe words of a tieredImageNet class: its first synonym (the second for a few), split on spaces."""
    synonyms = [s.strip() for s in label_str.split(",") if s.strip()]
    if not synonyms:
        return []
    name = synonyms[1] if synonyms[0] in TIERED_SECOND_SYNONYM and len(synonyms) > 1 else synonyms[0]
    return name.split()


def tiered_plan(split: str, path: Path) -> SplitPlan:
    """Labels and names of one split from ``<split>_labels.pkl`` (labels kept in the release's order)."""
    content = load_pickle(path)
    release_labels = np.asarray(pickle_field(content, "label_specific", path)).astype(np.int64).ravel()
    label_strs = list(pickle_field(content, "label_specific_str", path))
    labels, releases = label_classes(release_labels.tolist(), split, path)
    if releases[0] < 0 or releases[-1] >= len(label_strs):
        raise InputError(f"{path}: label_specific runs {releases[0]}..{releases[-1]} but label_specific_str "
                         f"names {len(label_strs)} classes")
    names = [str(label_strs[r]) for r in releases]
    return SplitPlan(split, labels, [str(r) for r in releases], names, [tiered_words(n) for n in names])


def tiered_image_reader(path: Path, count: int) -> ImageReader:
    """Reader over ``<split>_images_png.pkl``: a sequence of PNG-encoded images (uint8 arrays or bytes)."""
    blobs = load_pickle(path)
    if not hasattr(blobs, "__len__") or len(blobs) != count:
        found = len(blobs) if hasattr(blobs, "__len__") else type(blobs).__name__
        raise InputError(f"{path}: holds {found} images but the labels file lists {count}")

    def read(index: int) -> Image.Image:
        blob = blobs[index]
        if isinstance(blob, np.ndarray):
            blob = blob.tobytes()
        elif isinstance(blob, str):  # a Python 2 str decoded as latin1
            blob = blob.encode("latin1")
        return decode_image(bytes(blob), f"{path} image {index}")

    return read


def prepare_tiered(raw: Path, out: Path, glove_path: Path, seed: int) -> None:
    """tieredImageNet from the ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` release (84x84 PNGs)."""
    for split in SPLITS:
        for name in (f"{split}_images_png.pkl", f"{split}_labels.pkl"):
            require_file(raw / name, "tieredImageNet needs <split>_images_png.pkl and <split>_labels.pkl.")
    plans = [tiered_plan(split, raw / f"{split}_labels.pkl") for split in SPLITS]
    # The reader loads one split's pickle at a time: train alone is several GB.
    prepare_glove_splits(out, plans,
                         lambda plan: tiered_image_reader(raw / f"{plan.split}_images_png.pkl", len(plan.labels)),
                         glove_path, "uniform", seed)
