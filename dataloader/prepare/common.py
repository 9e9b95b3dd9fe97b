"""What the four dataset modules share: the split plan, image decoding and resizing, the shuffled write of a
split and the GloVe class vectors."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloader.glove import class_vectors, load_glove, vocabulary
from utils import InputError, atomic_write, save_npz

# One logger for the whole package, under the name the single-file module had.
log = logging.getLogger(__package__)

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
DEFAULT_SEED = 2045

ImageReader = Callable[[int], Image.Image]  # raw sample index -> decoded image


@dataclass
class SplitPlan:
    """What one split holds, known before any image is decoded.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        labels: (N,) int64 label of every raw sample, in raw order, 0..C-1.
        class_ids: C class ids in label order (wnid, CIFAR name, CUB official id, tiered release label).
        class_names: C readable names in label order.
        words: C word lists for the GloVe look-up (None when the vectors come from elsewhere).
    """

    split: str
    labels: np.ndarray
    class_ids: list[str]
    class_names: list[str]
    words: list[list[str]] | None = None


# ------------------------------------------------------------------------------------------ raw input


def require_file(path: Path, hint: str = "") -> Path:
    """``path`` if it is a file, else an InputError naming it."""
    if not path.is_file():
        raise InputError(f"{path} not found. {hint}".strip())
    return path


def table_rows(path: Path, num_fields: int, layout: str, maxsplit: int = -1,
               valid: Callable[[list[str]], bool] = lambda fields: True) -> Iterator[list[str]]:
    """The white-space separated fields of each non-blank line of a text table; InputError naming the file
    and the line when a line has not ``num_fields`` fields or fails ``valid``. ``layout`` reads e.g.
    ``'wnid index name'``."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split(maxsplit=maxsplit)
        if not fields:
            continue
        if len(fields) != num_fields or not valid(fields):
            raise InputError(f"{path}: line {number} is not '{layout}': {line!r}")
        yield fields


def name_words(name: str) -> list[str]:
    """GloVe words of an underscore-joined class name (``Red_fox`` -> ``['Red', 'fox']``)."""
    return [word for word in name.split("_") if word]


def label_classes(raw_classes: Sequence, split: str, source: Path) -> tuple[np.ndarray, list]:
    """Labels 0..C-1 by sorted class id: returns (N,) int64 labels and the C sorted class ids."""
    classes = sorted(set(raw_classes))
    if not classes:
        raise InputError(f"{source}: the {split} split has no samples")
    index = {class_id: label for label, class_id in enumerate(classes)}
    return np.array([index[c] for c in raw_classes], dtype=np.int64), classes


# --------------------------------------------------------------------------------------------- images


def to_84(image: Image.Image) -> np.ndarray:
    """(84, 84, 3) uint8 RGB: centre square crop of the shortest side, bilinear resize; 84x84 kept as is."""
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # crop() first: resize(box=...) would let the filter reach pixels outside the square at its borders.
        image = image.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                        Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes | Path, name: str) -> Image.Image:
    """Open and fully decode an image file or encoded bytes; InputError naming ``name`` when unreadable."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()  # PIL decodes lazily: force it here so a truncated file fails with its name
            return image
    except FileNotFoundError as err:
        raise InputError(f"{name}: image not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{name}: unreadable image ({err}). Re-download or remove it.") from err


def load_images(read: ImageReader, order: np.ndarray, desc: str) -> np.ndarray:
    """Decode raw samples ``order[0], order[1], ...`` into a preallocated (N, 84, 84, 3) uint8 array."""
    images = np.empty((len(order), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for slot, index in enumerate(tqdm(order, desc=desc, unit="img", mininterval=1.0)):
        images[slot] = to_84(read(int(index)))
    return images


# -------------------------------------------------------------------------------------- writing splits


def write_split(out_dir: str | Path, split: str, images: np.ndarray, targets: np.ndarray,
                vectors: np.ndarray, class_names: Sequence[tuple[str, str] | str]) -> None:
    """Write one prepared split, atomically: the images, the class vectors and the label -> class table.

    Args:
        out_dir: the dataset folder, e.g. ``data/mini``.
        split: ``train``, ``val`` or ``test``.
        images: (N, 84, 84, 3) uint8 RGB.
        targets: (N,) integer labels 0..C-1; every label must occur.
        vectors: (C, D) semantic vector of each label (stored float32).
        class_names: C entries in label order: ``(class id, readable name)`` pairs, or one string used as both.

    Files: ``few-shot-<split>.npz`` (features, targets int64), ``few-shot-wordemb-<split>.npz`` (features)
    and ``classes-<split>.txt``, whose line c + 1 is ``class id<TAB>name`` of label c.
    """
    out_dir = Path(out_dir)
    targets, vectors = np.asarray(targets), np.asarray(vectors)
    counts = _check_split(split, images, targets, vectors, len(class_names))
    save_npz(out_dir / f"few-shot-{split}.npz", features=images, targets=targets.astype(np.int64))
    save_npz(out_dir / f"few-shot-wordemb-{split}.npz", features=vectors.astype(np.float32))
    with atomic_write(out_dir / f"classes-{split}.txt", "w") as f:
        for entry in class_names:
            class_id, name = (entry, entry) if isinstance(entry, str) else entry
            # A tab or newline inside a name would break the one-line-per-label table.
            f.write(f"{_one_line(class_id)}\t{_one_line(name)}\n")
    log.info("%s %s: %d images, %d classes (%d to %d per class), D = %d -> %s", out_dir.name, split,
             len(images), len(class_names), counts.min(), counts.max(), vectors.shape[1], out_dir)


def _check_split(split: str, images: np.ndarray, targets: np.ndarray, vectors: np.ndarray,
                 num_classes: int) -> np.ndarray:
    """Raise ValueError unless the arrays fit the prepared format; return the (C,) number of images per label."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{split}: images must be uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got "
                         f"{images.dtype} {images.shape}")
    if targets.shape != (len(images),) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"{split}: targets must be integers of shape ({len(images)},), got "
                         f"{targets.dtype} {targets.shape}")
    if vectors.ndim != 2 or len(vectors) != num_classes:
        raise ValueError(f"{split}: vectors must be ({num_classes}, D) for {num_classes} classes, got "
                         f"{vectors.shape}")
    counts = np.bincount(targets, minlength=num_classes) if len(targets) and targets.min() >= 0 else None
    if counts is None or len(counts) != num_classes or (counts == 0).any():
        raise ValueError(f"{split}: targets must cover every label 0..{num_classes - 1} and nothing else")
    return counts


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def prepare_split(out_dir: Path, plan: SplitPlan, read: ImageReader, vectors: np.ndarray, seed: int) -> None:
    """Decode the split's images in shuffled order and write it with :func:`write_split`."""
    order = np.random.RandomState(seed).permutation(len(plan.labels))
    images = load_images(read, order, desc=f"{out_dir.name} {plan.split}")
    write_split(out_dir, plan.split, images, plan.labels[order], vectors,
                list(zip(plan.class_ids, plan.class_names)))


def prepare_glove_splits(out_dir: Path, plans: list[SplitPlan], reader: Callable[[SplitPlan], ImageReader],
                         glove_path: Path, fallback: str, seed: int) -> None:
    """Write every split of ``plans`` with GloVe class vectors, from one streaming pass over the GloVe file.

    ``reader(plan)`` is called once per split, just before that split is decoded, so a dataset can hold one
    split's raw images in memory at a time. ``fallback`` (``zeros`` or ``uniform``) is the vector of a class
    without any word in GloVe (see ``dataloader.glove.class_vectors``).
    """
    glove = load_glove(glove_path, vocabulary(words for plan in plans for words in plan.words))
    # One generator for all splits, drawn in split order, so no two fallback classes share a vector.
    rng = np.random.RandomState(seed)
    vectors = {plan.split: class_vectors(plan.words, glove, fallback, rng=rng, class_ids=plan.class_ids)
               for plan in plans}
    for plan in plans:
        prepare_split(out_dir, plan, reader(plan), vectors[plan.split], seed)
