"""Your own classes: ``DIR/train/``, ``DIR/val/`` and ``DIR/test/``, each with one sub-folder per class holding
any images PIL reads. A class is named by its folder (``_`` and ``-`` read as spaces) unless ``DIR/classes.txt``
maps the folder to a name (``folder name`` per line). Class vectors: GloVe, zeros for a class without any word,
as miniImageNet. ``trainer.predict`` reads its support folder with the same rules."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dataloader.glove import class_vectors, load_glove, vocabulary
from dataloader.prepare.common import SPLITS, decode_image, load_images, log, table_rows, write_split
from utils import InputError

# The file suffixes of the formats PIL can open (not those it can only write, such as .pdf).
IMAGE_SUFFIXES = frozenset(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)
NAMES_FILE = "classes.txt"


@dataclass
class ClassFolder:
    """One class: its folder name (the class id), its readable name and its image files in name order."""

    folder: str
    name: str
    images: list[Path]


def readable_name(text: str) -> str:
    """``Red_fox`` or ``red-fox`` -> ``Red fox``: underscores and hyphens read as spaces."""
    return " ".join(text.replace("_", " ").replace("-", " ").split())


def class_words(name: str) -> list[str]:
    """The GloVe words of a readable class name, lower-cased as for miniImageNet."""
    return name.lower().split()


def read_names(path: Path) -> dict[str, str]:
    """folder -> readable name from ``classes.txt`` (``folder name`` per line); empty when there is none."""
    if not path.is_file():
        return {}
    return {folder: readable_name(name) for folder, name in table_rows(path, 2, "folder name", maxsplit=1)}


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files of ``folder`` (by suffix) in name order, and the other files; hidden files are ignored."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p not in images]


def read_class_folders(root: Path, names: dict[str, str], min_classes: int, why: str) -> list[ClassFolder]:
    """The class sub-folders of ``root`` in name order; InputError naming the folder when ``root`` is missing, a
    class folder holds no image or there are fewer than ``min_classes`` classes (``why`` says why not)."""
    if not root.is_dir():
        raise InputError(f"{root}: folder not found; it must hold one sub-folder of images per class.")
    classes, others = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images, skipped = image_files(folder)
        if not images:
            raise InputError(f"{folder}: class folder without images (none of its files has an image suffix "
                             f"PIL opens, such as .jpg or .png). Add images or remove the folder.")
        classes.append(ClassFolder(folder.name, names.get(folder.name, readable_name(folder.name)), images))
        others += skipped
    if others:
        log.warning("%s: skipped %d file(s) that are not images, e.g. %s", root, len(others), others[0])
    if len(classes) < min_classes:
        raise InputError(f"{root}: {len(classes)} class folder(s); {why}.")
    return classes


def check_names_used(path: Path, names: dict[str, str], classes: list[ClassFolder]) -> None:
    """Refuse a ``classes.txt`` line for a folder that does not exist: a typo would silently keep the folder name."""
    unused = sorted(set(names) - {c.folder for c in classes})
    if unused:
        raise InputError(f"{path}: no class folder named {', '.join(unused[:5])}; fix the line(s) or remove them.")


def load_folder_images(files: list[Path], desc: str) -> np.ndarray:
    """(N, 84, 84, 3) uint8 of image files, cropped and resized as every prepared dataset; InputError naming an
    unreadable file."""
    return load_images(lambda i: decode_image(files[i], str(files[i])), np.arange(len(files)), desc)


def glove_class_vectors(classes: list[ClassFolder], glove_path: Path, class_ids: list[str]) -> np.ndarray:
    """(C, D) float32 mean GloVe vector of each class name, zeros for a name without any word in GloVe."""
    words = [class_words(c.name) for c in classes]
    return class_vectors(words, load_glove(glove_path, vocabulary(words)), "zeros", class_ids=class_ids)


def prepare_folder(raw: Path, out: Path, glove_path: Path, seed: int, way: int) -> None:
    """Prepare ``raw/{train,val,test}/<class>/<images>`` into ``out``, samples shuffled by ``seed``.

    Every image is decoded before the first file is written, so a bad image leaves no partial dataset (the
    decoded images take 21 KB each in memory).
    """
    names = read_names(raw / NAMES_FILE)
    why = f"an episode draws --way {way} classes: add class folders or lower --way"
    splits = {split: read_class_folders(raw / split, names, way, why) for split in SPLITS}
    check_names_used(raw / NAMES_FILE, names, [c for classes in splits.values() for c in classes])
    ordered = [(split, c) for split in SPLITS for c in splits[split]]
    vectors = glove_class_vectors([c for _, c in ordered], glove_path, [f"{s}/{c.folder}" for s, c in ordered])
    decoded = {}
    for split, classes in splits.items():
        files = [path for c in classes for path in c.images]
        labels = np.repeat(np.arange(len(classes)), [len(c.images) for c in classes])
        order = np.random.RandomState(seed).permutation(len(files))
        decoded[split] = load_folder_images([files[i] for i in order], f"{out.name} {split}"), labels[order]
    start = 0
    for split, classes in splits.items():
        images, labels = decoded[split]
        write_split(out, split, images, labels, vectors[start:start + len(classes)],
                    [(c.folder, c.name) for c in classes])
        start += len(classes)
