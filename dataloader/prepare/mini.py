"""miniImageNet (Ravi & Larochelle split): ``images/`` or ``images.zip``, the split csvs and the wnid -> name
table ``mini_imagenet_class_label_dict3.txt``. Class vectors: GloVe, zeros for a class without any word."""
from __future__ import annotations

import contextlib
import csv
import zipfile
from pathlib import Path
from typing import Callable

from PIL import Image

from dataloader.prepare.common import (SPLITS, ImageReader, SplitPlan, decode_image, label_classes, name_words,
                                       prepare_glove_splits, require_file, table_rows)
from utils import InputError


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
    return {wnid: name.strip() for wnid, _, name in table_rows(path, 3, "wnid index name", maxsplit=2)}


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
                                   [name_words(names[w].lower()) for w in classes]))

        def reader(plan: SplitPlan) -> ImageReader:
            files = splits[plan.split][0]
            return lambda i: open_image(files[i])

        prepare_glove_splits(out, plans, reader, glove_path, "zeros", seed)
