"""Turn a raw benchmark download into the files the loaders read (DESIGN A1, A2).

    python -m dataloader.prepare mini     --raw DIR --glove glove.840B.300d.txt --out data/mini
    python -m dataloader.prepare tiered   --raw DIR --glove glove.840B.300d.txt --out data/tiered
    python -m dataloader.prepare cifar_fs --raw DIR --glove glove.840B.300d.txt --out data/cifar_fs
    python -m dataloader.prepare cub      --raw CUB_200_2011 --out data/cub

For each split (train, val, test) it writes into ``--out``:
    few-shot-<split>.npz          features uint8 (N, 84, 84, 3) RGB, targets int64 (N,) labels 0..C-1
    few-shot-wordemb-<split>.npz  features float32 (C, D): row c is the semantic vector of label c
    classes-<split>.txt           one line per label: class id <TAB> class name

Rules shared by the four datasets:
- Images: centre square crop of the shortest side, bilinear resize to 84x84 with PIL (the original used the
  removed ``scipy.misc.imresize``); images already 84x84 are stored as decoded.
- Labels: classes of a split in sorted id order (wnids, CIFAR fine-label names, CUB official ids), except
  tieredImageNet, whose pickle release has no wnids: its labels keep the release's ``label_specific`` order.
- Samples: each split lists its samples in the raw order (the csv rows for mini, the pickle order for tiered
  and CIFAR-FS, CIFAR-100 train then test, CUB class by class in file-name order) and stores them permuted by
  ``np.random.RandomState(seed).permutation(N)``: stored sample i is raw sample ``order[i]``. The permutation
  is applied while decoding, so the large tieredImageNet array is never copied.
- Semantic vectors: the mean GloVe vector of the words of the class name (see ``dataloader.glove``), with
  zeros (mini) or U(-1, 1) (tiered, CIFAR-FS; one ``RandomState(seed)`` drawn in split order) when no word
  is found; CUB uses its 312 class attributes instead.

Deliberate differences from the original release:
- CIFAR-FS images (32x32) are upsampled bilinearly to 84x84 here, so that every dataset's npz holds
  (N, 84, 84, 3) and the loaders need no dataset-specific branch. The original stored 32x32 and resized in
  the loader (Resize 92 -> CenterCrop 84), so CIFAR-FS pixels reach the network through a different
  interpolation path.
- tieredImageNet PNGs are decoded with PIL into RGB (A1 stores RGB everywhere).
- Pickles are read with an unpickler that rebuilds only NumPy arrays and builtin containers: a downloaded
  pickle cannot run code.

Bad raw input (a missing split file or image, an unreadable image, a class without a name, an attribute
table of the wrong shape, ...) raises ``utils.InputError`` naming the file, before the long work where the
check is cheap. Memory: tieredImageNet's train split needs its pickle (~4 GB) plus the decoded array
(448,695 x 84 x 84 x 3 bytes, 9.5 GB) in RAM at once.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloader.glove import class_vectors, load_glove, vocabulary
from utils import InputError, atomic_write, resolve_path, save_npz

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 84
DEFAULT_SEED = 2045
DATASETS = ("mini", "tiered", "cifar_fs", "cub")

# CIFAR-100 fine labels in id order (the order of ``fine_label_names`` in its ``meta`` pickle), for
# CIFAR-FS pickles that arrive without the CIFAR-100 meta file.
CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm").split()

# The original tieredImageNet preprocessing names these classes by their second synonym.
TIERED_SECOND_SYNONYM = frozenset({"limpkin", "otterhound", "barracouta", "lycaenid"})

ImageReader = Callable[[int], Image.Image]  # raw sample index -> decoded image


# ------------------------------------------------------------------------------------------------ shared


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


def require_file(path: Path, hint: str = "") -> Path:
    """``path`` if it is a file, else an InputError naming it."""
    if not path.is_file():
        raise InputError(f"{path} not found. {hint}".strip())
    return path


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
    """Raise ValueError unless the arrays fit A1; return the (C,) number of images per label."""
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


def glove_vectors(plans: list[SplitPlan], glove_path: Path, fallback: str, seed: int) -> dict[str, np.ndarray]:
    """(C, D) float32 class vectors of every split, from one streaming pass over the GloVe file."""
    glove = load_glove(glove_path, vocabulary(words for plan in plans for words in plan.words))
    # One generator for all splits, drawn in split order, so no two fallback classes share a vector.
    rng = np.random.RandomState(seed)
    return {plan.split: class_vectors(plan.words, glove, fallback, rng=rng, class_ids=plan.class_ids)
            for plan in plans}


def label_classes(raw_classes: Sequence, split: str, source: Path) -> tuple[np.ndarray, list]:
    """Labels 0..C-1 by sorted class id: returns (N,) int64 labels and the C sorted class ids."""
    classes = sorted(set(raw_classes))
    if not classes:
        raise InputError(f"{source}: the {split} split has no samples")
    index = {class_id: label for label, class_id in enumerate(classes)}
    return np.array([index[c] for c in raw_classes], dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------- pickles

# Globals a data pickle may name: NumPy's array/scalar rebuilders and the byte codec they use.
_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
}


class _DataUnpickler(pickle.Unpickler):
    """Rebuilds arrays, numbers, strings and containers only; any other global is refused."""

    def find_class(self, module: str, name: str):
        # Python 2 / NumPy 1 pickles name ``numpy.core``; NumPy 2 moved it to ``numpy._core``.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not plain data)")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """Load a (possibly Python 2) data pickle; InputError naming the file when it cannot be read."""
    require_file(path)
    log.info("loading %s", path)
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 byte strings back into the bytes NumPy stored in them.
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise InputError(f"{path}: not a readable data pickle ({err}). Re-download it.") from err


def pickle_field(content, key: str, path: Path):
    """``content[key]`` of a loaded pickle dict; InputError naming the file and the keys it has."""
    if not isinstance(content, dict) or key not in content:
        keys = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path}: expected a dict with key '{key}', found {keys}")
    return content[key]


# ------------------------------------------------------------------------------------------ miniImageNet


def read_csv_split(path: Path) -> tuple[list[str], list[str]]:
    """File names and wnids of a ``filename,label`` csv (header line first)."""
    require_file(path, "miniImageNet needs train.csv, val.csv and test.csv (filename,label) in --raw.")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise InputError(f"{path}: the first line must be the header 'filename,label'")
    bad = [n + 2 for n, row in enumerate(rows[1:]) if len(row) != 2]
    if bad:
        raise InputError(f"{path}: line(s) {bad[:5]} do not have two fields 'filename,label'")
    return [row[0].strip() for row in rows[1:]], [row[1].strip() for row in rows[1:]]


def read_mini_names(path: Path) -> dict[str, str]:
    """wnid -> name from ``mini_imagenet_class_label_dict3.txt`` (``wnid index name`` per line)."""
    require_file(path, "It maps each wnid to the class name used for the GloVe look-up.")
    names = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split(maxsplit=2)
        if not fields:
            continue
        if len(fields) != 3:
            raise InputError(f"{path}: line {number} is not 'wnid index name': {line!r}")
        names[fields[0]] = fields[2].strip()
    return names


def mini_image_reader(raw: Path, stack: contextlib.ExitStack
                      ) -> tuple[Path, Callable[[str], bool], Callable[[str], Image.Image]]:
    """(where, exists(filename), open(filename)) over ``raw/images/`` or, failing that, ``raw/images.zip``."""
    folder, archive = raw / "images", raw / "images.zip"
    if folder.is_dir():
        return (folder, lambda name: (folder / name).is_file(),
                lambda name: decode_image(folder / name, str(folder / name)))
    require_file(archive, f"miniImageNet images go in {folder}/ or {archive}.")
    try:
        zipped = stack.enter_context(zipfile.ZipFile(archive))
    except zipfile.BadZipFile as err:
        raise InputError(f"{archive}: not a readable zip file ({err})") from err
    # Zips of the release keep the images under images/; match members by base name so any layout works.
    members = {Path(member).name: member for member in zipped.namelist() if not member.endswith("/")}
    return (archive, lambda name: name in members,
            lambda name: decode_image(zipped.read(members[name]), f"{archive}:{members[name]}"))


def prepare_mini(raw: Path, out: Path, glove_path: Path, seed: int) -> None:
    """miniImageNet (Ravi & Larochelle split): images/ or images.zip, split csvs, the wnid -> name table."""
    splits = {split: read_csv_split(raw / f"{split}.csv") for split in SPLITS}
    dict_path = raw / "mini_imagenet_class_label_dict3.txt"
    names = read_mini_names(dict_path)
    with contextlib.ExitStack() as stack:
        where, exists, open_image = mini_image_reader(raw, stack)
        plans = []
        for split, (files, wnids) in splits.items():
            missing = [name for name in files if not exists(name)]
            if missing:
                raise InputError(f"{where}: {len(missing)} image(s) of {split}.csv not found, "
                                 f"e.g. {missing[0]}")
            labels, classes = label_classes(wnids, split, raw / f"{split}.csv")
            unnamed = [wnid for wnid in classes if wnid not in names]
            if unnamed:
                raise InputError(f"{dict_path}: no name for wnid(s) {unnamed[:5]} of {split}.csv")
            plans.append(SplitPlan(split, labels, classes, [names[w] for w in classes],
                                   [[word for word in names[w].lower().split("_") if word] for w in classes]))
        vectors = glove_vectors(plans, glove_path, "zeros", seed)
        for plan in plans:
            files = splits[plan.split][0]
            prepare_split(out, plan, lambda i, files=files: open_image(files[i]), vectors[plan.split], seed)


# ---------------------------------------------------------------------------------------- tieredImageNet


def tiered_words(label_str: str) -> list[str]:
    """GloVe words of a tieredImageNet class: its first synonym (the second for a few), split on spaces."""
    synonyms = [s.strip() for s in label_str.split(",") if s.strip()]
    if not synonyms:
        return []
    name = synonyms[1] if synonyms[0] in TIERED_SECOND_SYNONYM and len(synonyms) > 1 else synonyms[0]
    return name.split()


def plan_tiered(split: str, path: Path) -> SplitPlan:
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
    plans = [plan_tiered(split, raw / f"{split}_labels.pkl") for split in SPLITS]
    vectors = glove_vectors(plans, glove_path, "uniform", seed)
    for plan in plans:
        # One split's pickle at a time: train alone is several GB.
        read = tiered_image_reader(raw / f"{plan.split}_images_png.pkl", len(plan.labels))
        prepare_split(out, plan, read, vectors[plan.split], seed)


# ---------------------------------------------------------------------------------------------- CIFAR-FS


def cifar_fine_names(raw: Path) -> list[str]:
    """CIFAR-100 fine-label names in id order: from a ``meta`` pickle in --raw if any, else built in."""
    for path in (raw / "meta", raw / "cifar-100-python" / "meta"):
        if path.is_file():
            return [str(name) for name in pickle_field(load_pickle(path), "fine_label_names", path)]
    return list(CIFAR100_FINE_NAMES)


def read_split_json(path: Path, fine_names: list[str]) -> list[str]:
    """Class names of a CIFAR-FS split file: a JSON list of ``[superclass, class]`` pairs."""
    require_file(path, "CIFAR-FS needs train.json, val.json and test.json (lists of [superclass, class]) "
                       "in --raw or --split_dir.")
    try:
        pairs = json.loads(path.read_text())
        classes = [pair[1] for pair in pairs]
    except (json.JSONDecodeError, TypeError, IndexError, KeyError) as err:
        raise InputError(f"{path}: expected a JSON list of [superclass, class] pairs ({err})") from err
    unknown = [c for c in classes if c not in fine_names]
    if unknown:
        raise InputError(f"{path}: {unknown[:5]} are not CIFAR-100 fine-label names")
    return classes


def cifar_plan(split: str, fine_ids: np.ndarray, fine_names: list[str], source: Path) -> SplitPlan:
    """Labels by sorted fine-label name; ``fine_ids`` (N,) are the CIFAR-100 ids of the raw samples."""
    if len(fine_ids) and (fine_ids.min() < 0 or fine_ids.max() >= len(fine_names)):
        raise InputError(f"{source}: labels must be CIFAR-100 fine ids 0..{len(fine_names) - 1}")
    labels, classes = label_classes([fine_names[i] for i in fine_ids], split, source)
    return SplitPlan(split, labels, classes, classes, [[w for w in c.split("_") if w] for c in classes])


def cifar_images(data, path: Path, count: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from a CIFAR-FS ``data`` (N, 32, 32, 3) or CIFAR-100 ``data`` (N, 3072) array."""
    data = np.asarray(data)
    if data.shape == (count, 3072):
        data = data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR-100 rows are channel-major
    if data.shape != (count, 32, 32, 3) or data.dtype != np.uint8:
        raise InputError(f"{path}: 'data' must be uint8 ({count}, 32, 32, 3) or ({count}, 3072), "
                         f"got {data.dtype} {data.shape}")
    return data


def cifar_fs_from_pickles(raw: Path) -> list[tuple[SplitPlan, np.ndarray]]:
    """Plans and (N, 32, 32, 3) images from ``CIFAR_FS_<split>.pickle`` (keys data, labels)."""
    paths = {split: require_file(raw / f"CIFAR_FS_{split}.pickle") for split in SPLITS}
    fine_names = cifar_fine_names(raw)
    result = []
    for split, path in paths.items():
        content = load_pickle(path)
        fine_ids = np.asarray(pickle_field(content, "labels", path), dtype=np.int64).ravel()
        images = cifar_images(pickle_field(content, "data", path), path, len(fine_ids))
        result.append((cifar_plan(split, fine_ids, fine_names, path), images))
    return result


def cifar_fs_from_cifar100(folder: Path, split_dir: Path) -> list[tuple[SplitPlan, np.ndarray]]:
    """Plans and images from CIFAR-100's python pickles plus the 64/16/20 class split in JSON.

    A split's samples are every CIFAR-100 train image of its classes followed by every test image (600 per
    class in the full data set).
    """
    meta_path = require_file(folder / "meta", "CIFAR-100 python layout: cifar-100-python/{train,test,meta}.")
    fine_names = [str(n) for n in pickle_field(load_pickle(meta_path), "fine_label_names", meta_path)]
    split_classes = {split: read_split_json(split_dir / f"{split}.json", fine_names) for split in SPLITS}
    parts_images, parts_ids = [], []
    for part in ("train", "test"):
        path = require_file(folder / part)
        content = load_pickle(path)
        fine_ids = np.asarray(pickle_field(content, "fine_labels", path), dtype=np.int64).ravel()
        parts_images.append(cifar_images(pickle_field(content, "data", path), path, len(fine_ids)))
        parts_ids.append(fine_ids)
    all_images, all_ids = np.concatenate(parts_images), np.concatenate(parts_ids)
    result = []
    for split, classes in split_classes.items():
        wanted = np.isin(all_ids, [fine_names.index(c) for c in classes])
        absent = sorted(set(classes) - {fine_names[i] for i in np.unique(all_ids[wanted])})
        if absent:
            raise InputError(f"{folder}: no image of the {split} class(es) {absent[:5]} "
                             f"(listed in {split_dir / f'{split}.json'})")
        plan = cifar_plan(split, all_ids[wanted], fine_names, split_dir / f"{split}.json")
        result.append((plan, all_images[wanted]))
    return result


def prepare_cifar_fs(raw: Path, out: Path, glove_path: Path, seed: int, split_dir: Path | None) -> None:
    """CIFAR-FS from its pickles, or from CIFAR-100's python pickles plus the class split JSON files."""
    cifar100 = next((folder for folder in (raw / "cifar-100-python", raw) if (folder / "meta").is_file()
                     and (folder / "train").is_file()), None)
    if any((raw / f"CIFAR_FS_{split}.pickle").is_file() for split in SPLITS):
        splits = cifar_fs_from_pickles(raw)
    elif cifar100 is not None:
        splits = cifar_fs_from_cifar100(cifar100, split_dir if split_dir is not None else raw)
    else:
        raise InputError(f"{raw}: found neither CIFAR_FS_<split>.pickle files nor cifar-100-python/"
                         f"{{train,test,meta}}. Point --raw at the folder that holds one of them.")
    plans = [plan for plan, _ in splits]
    vectors = glove_vectors(plans, glove_path, "uniform", seed)
    for plan, images in splits:
        prepare_split(out, plan, lambda i, images=images: Image.fromarray(images[i]), vectors[plan.split], seed)


# --------------------------------------------------------------------------------------------- CUB-200


def cub_split(official_id: int) -> str:
    """The original's split of 0-based class index i = id - 1: train i%2==0, val i%4==1, test i%4==3."""
    index = official_id - 1
    return "train" if index % 2 == 0 else ("val" if index % 4 == 1 else "test")


def read_cub_classes(path: Path) -> dict[int, str]:
    """Official id -> folder name (``NNN.Class_Name``) from ``classes.txt``."""
    require_file(path, "--raw must be the CUB_200_2011 folder of the official release.")
    classes = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise InputError(f"{path}: line {number} is not 'id NNN.Class_Name': {line!r}")
        classes[int(fields[0])] = fields[1]
    return classes


def read_cub_attributes(path: Path, num_classes: int) -> np.ndarray:
    """(num_classes, D) float32 class attributes; row i is official class i + 1."""
    require_file(path, "CUB class vectors come from attributes/class_attribute_labels_continuous.txt.")
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise InputError(f"{path}: not a table of numbers ({err})") from err
    if table.shape[0] != num_classes or table.shape[1] == 0:
        raise InputError(f"{path}: expected one row per class of classes.txt ({num_classes} x D, "
                         f"312 in the release), got {table.shape[0]} x {table.shape[1]}")
    return table.astype(np.float32)


def cub_class_images(images_dir: Path, classes: dict[int, str]) -> dict[int, list[Path]]:
    """Official id -> sorted image files, from the folders ``images/NNN.Class_Name``; ids come from the names."""
    found = {}
    for folder in sorted(images_dir.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        prefix = folder.name.split(".", 1)[0]
        if not prefix.isdigit() or int(prefix) not in classes:
            raise InputError(f"{folder}: folder name does not start with an official class id of classes.txt "
                             f"('NNN.Class_Name')")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            found[int(prefix)] = files
    missing = sorted(set(classes) - set(found))
    if missing:
        log.warning("%s: %d of %d classes have no images and are left out: %s", images_dir, len(missing),
                    len(classes), ", ".join(classes[i] for i in missing))
    return found


def prepare_cub(raw: Path, out: Path, seed: int) -> None:
    """CUB-200-2011 (official layout); the class vectors are the 312 continuous class attributes."""
    if not (raw / "classes.txt").is_file() and (raw / "CUB_200_2011" / "classes.txt").is_file():
        raw = raw / "CUB_200_2011"
    classes = read_cub_classes(raw / "classes.txt")
    attributes = read_cub_attributes(raw / "attributes" / "class_attribute_labels_continuous.txt", len(classes))
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise InputError(f"{raw / 'classes.txt'}: ids must run 1..{len(classes)} to index the attribute rows")
    images_dir = raw / "images"
    if not images_dir.is_dir():
        raise InputError(f"{images_dir} not found: --raw must be the CUB_200_2011 folder")
    files = cub_class_images(images_dir, classes)
    for split in SPLITS:
        ids = sorted(i for i in files if cub_split(i) == split)
        if not ids:
            raise InputError(f"{images_dir}: no class of the {split} split has images")
        paths = [path for i in ids for path in files[i]]
        labels = np.repeat(np.arange(len(ids), dtype=np.int64), [len(files[i]) for i in ids])
        plan = SplitPlan(split, labels, [f"{i:03d}" for i in ids],
                         [classes[i].split(".", 1)[-1] for i in ids])
        prepare_split(out, plan, lambda k, paths=paths: decode_image(paths[k], str(paths[k])),
                      attributes[[i - 1 for i in ids]], seed)


# -------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dataloader.prepare",
        description="Prepare a raw few-shot benchmark download into few-shot-<split>.npz, "
                    "few-shot-wordemb-<split>.npz and classes-<split>.txt.")
    parser.add_argument("dataset", choices=DATASETS, help="which benchmark the raw folder holds")
    parser.add_argument("--raw", required=True,
                        help="raw download: mini: images/ or images.zip + <split>.csv + "
                             "mini_imagenet_class_label_dict3.txt; tiered: <split>_images_png.pkl + "
                             "<split>_labels.pkl; cifar_fs: CIFAR_FS_<split>.pickle or cifar-100-python/; "
                             "cub: the CUB_200_2011 folder")
    parser.add_argument("--glove", default=None,
                        help="GloVe text file, e.g. glove.840B.300d.txt (required except for cub)")
    parser.add_argument("--out", default=None,
                        help="dataset folder to write (default: data/<dataset>)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the per-split sample shuffle and of the U(-1,1) fallback vectors")
    parser.add_argument("--split_dir", default=None,
                        help="cifar_fs from CIFAR-100 only: folder with train.json/val.json/test.json "
                             "(default: --raw)")
    return parser.parse_args(argv)


def prepare(dataset: str, raw: Path, out: Path, glove: Path | None = None, seed: int = DEFAULT_SEED,
            split_dir: Path | None = None) -> None:
    """Prepare ``dataset`` from the raw folder ``raw`` into the dataset folder ``out``."""
    if not raw.is_dir():
        raise InputError(f"--raw {raw}: folder not found")
    if dataset == "cub":
        if glove is not None:
            log.info("cub uses its class attributes; --glove is ignored")
        prepare_cub(raw, out, seed)
        return
    if glove is None:
        raise InputError(f"{dataset} needs --glove FILE (a GloVe text file such as glove.840B.300d.txt)")
    require_file(glove, "Pass --glove with the path of a GloVe text file such as glove.840B.300d.txt.")
    if dataset == "mini":
        prepare_mini(raw, out, glove, seed)
    elif dataset == "tiered":
        prepare_tiered(raw, out, glove, seed)
    else:
        prepare_cifar_fs(raw, out, glove, seed, split_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        prepare(args.dataset, resolve_path(args.raw), resolve_path(args.out or f"data/{args.dataset}"),
                None if args.glove is None else resolve_path(args.glove), args.seed,
                None if args.split_dir is None else resolve_path(args.split_dir))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s prepared in %.1f s", args.dataset, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
