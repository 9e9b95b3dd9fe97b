"""CUB-200-2011 in its official layout. Split by official class id as the original did; the class vectors
are the 312 continuous class attributes, not GloVe."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dataloader.prepare.common import SPLITS, SplitPlan, decode_image, log, prepare_split, require_file, table_rows
from utils import InputError


def cub_split(official_id: int) -> str:
    """The original's split of 0-based class index i = id - 1: train i%2==0, val i%4==1, test i%4==3."""
    index = official_id - 1
    return "train" if index % 2 == 0 else ("val" if index % 4 == 1 else "test")


def read_cub_classes(path: Path) -> dict[int, str]:
    """Official id -> folder name (``NNN.Class_Name``) from ``classes.txt``."""
    require_file(path, "--raw must be the CUB_200_2011 folder of the official release.")
    rows = table_rows(path, 2, "id NNN.Class_Name", valid=lambda fields: fields[0].isdigit())
    return {int(official_id): folder_name for official_id, folder_name in rows}


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
