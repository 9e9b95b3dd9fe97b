"""tieredImageNet from the ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` release (84x84 PNGs). The release
has no wnids: labels keep its ``label_specific`` order. Class vectors: GloVe, U(-1, 1) for a class without
any word.

Channel order: RGB by default, like every other dataset. The original code decoded these PNGs with OpenCV
(``cv2.imdecode``), which returns BGR, and then normalised them with RGB statistics, so a backbone it trained on
tieredImageNet saw BGR images; ``channel_order="bgr"`` stores the images that way, to evaluate such a backbone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dataloader.prepare.common import (SPLITS, ImageReader, SplitPlan, decode_image, label_classes, log,
                                       prepare_glove_splits, require_file)
from dataloader.prepare.pickles import load_pickle, pickle_field
from utils import InputError

CHANNEL_ORDERS = ("rgb", "bgr")

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


def tiered_image_reader(path: Path, count: int, channel_order: str = "rgb") -> ImageReader:
    """Reader over ``<split>_images_png.pkl``: a sequence of PNG-encoded images (uint8 arrays or bytes).

    With ``channel_order="bgr"`` each decoded (H, W, 3) image has its channel axis reversed, which is what
    ``cv2.imdecode`` gives; the 84x84 crop and resize act on each channel alone, so reversing before them equals
    reversing after.
    """
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
        image = decode_image(bytes(blob), f"{path} image {index}")
        if channel_order == "bgr":
            image = Image.fromarray(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]))
        return image

    return read


def prepare_tiered(raw: Path, out: Path, glove_path: Path, seed: int, channel_order: str = "rgb") -> None:
    """tieredImageNet from the ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` release (84x84 PNGs).

    ``channel_order``: ``rgb`` (default) or ``bgr``, the order the original code's arrays hold (see the module
    docstring); (N, 84, 84, 3) uint8 either way.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise InputError(f"--channel_order must be one of {', '.join(CHANNEL_ORDERS)}, got {channel_order!r}")
    if channel_order == "bgr":
        log.warning("tiered: storing BGR images in %s (--channel_order bgr), for a backbone the original code "
                    "trained on tieredImageNet; backbones trained here expect the default rgb", out)
    for split in SPLITS:
        for name in (f"{split}_images_png.pkl", f"{split}_labels.pkl"):
            require_file(raw / name, "tieredImageNet needs <split>_images_png.pkl and <split>_labels.pkl.")
    plans = [tiered_plan(split, raw / f"{split}_labels.pkl") for split in SPLITS]
    # The reader loads one split's pickle at a time: train alone is several GB.
    prepare_glove_splits(out, plans,
                         lambda plan: tiered_image_reader(raw / f"{plan.split}_images_png.pkl", len(plan.labels),
                                                          channel_order),
                         glove_path, "uniform", seed)
