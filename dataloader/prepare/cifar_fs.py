"""CIFAR-FS from its ``CIFAR_FS_<split>.pickle`` files, or from CIFAR-100's python pickles plus the 64/16/20
class split in JSON. The 32x32 images are upsampled to 84x84. Class vectors: GloVe, U(-1, 1) for a class
without any word."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dataloader.prepare.common import (SPLITS, SplitPlan, label_classes, name_words, prepare_glove_splits,
                                       require_file)
from dataloader.prepare.pickles import load_pickle, pickle_field
from utils import InputError

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

Splits = list[tuple[SplitPlan, np.ndarray]]  # each split's plan and its (N, 32, 32, 3) uint8 raw images


def read_fine_names(meta_path: Path) -> list[str]:
    """CIFAR-100 fine-label names in id order, from its ``meta`` pickle."""
    return [str(name) for name in pickle_field(load_pickle(meta_path), "fine_label_names", meta_path)]


def cifar_fine_names(raw: Path) -> list[str]:
    """CIFAR-100 fine-label names in id order: from a ``meta`` pickle in --raw if any, else built in."""
    for path in (raw / "meta", raw / "cifar-100-python" / "meta"):
        if path.is_file():
            return read_fine_names(path)
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
    return SplitPlan(split, labels, classes, classes, [name_words(c) for c in classes])


def read_cifar_pickle(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 fine ids (under ``labels_key``) and (N, 32, 32, 3) uint8 images of a CIFAR pickle, whose
    ``data`` is (N, 32, 32, 3) (CIFAR-FS) or (N, 3072) (CIFAR-100)."""
    content = load_pickle(path)
    fine_ids = np.asarray(pickle_field(content, labels_key, path), dtype=np.int64).ravel()
    count = len(fine_ids)
    data = np.asarray(pickle_field(content, "data", path))
    if data.shape == (count, 3072):
        data = data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR-100 rows are channel-major
    if data.shape != (count, 32, 32, 3) or data.dtype != np.uint8:
        raise InputError(f"{path}: 'data' must be uint8 ({count}, 32, 32, 3) or ({count}, 3072), "
                         f"got {data.dtype} {data.shape}")
    return fine_ids, data


def cifar_fs_from_pickles(raw: Path) -> Splits:
    """Plans and images from ``CIFAR_FS_<split>.pickle`` (keys data, labels)."""
    paths = {split: require_file(raw / f"CIFAR_FS_{split}.pickle", "CIFAR-FS needs CIFAR_FS_train.pickle, "
                                 "CIFAR_FS_val.pickle and CIFAR_FS_test.pickle in --raw.") for split in SPLITS}
    fine_names = cifar_fine_names(raw)
    result = []
    for split, path in paths.items():
        fine_ids, images = read_cifar_pickle(path, "labels")
        result.append((cifar_plan(split, fine_ids, fine_names, path), images))
    return result


def cifar_fs_from_cifar100(folder: Path, split_dir: Path) -> Splits:
    """Plans and images from CIFAR-100's python pickles plus the 64/16/20 class split in JSON.

    A split's samples are every CIFAR-100 train image of its classes followed by every test image (600 per
    class in the full data set).
    """
    meta_path = require_file(folder / "meta", "CIFAR-100 python layout: cifar-100-python/{train,test,meta}.")
    fine_names = read_fine_names(meta_path)
    split_classes = {split: read_split_json(split_dir / f"{split}.json", fine_names) for split in SPLITS}
    parts = [read_cifar_pickle(folder / part, "fine_labels") for part in ("train", "test")]
    all_ids = np.concatenate([fine_ids for fine_ids, _ in parts])
    all_images = np.concatenate([images for _, images in parts])
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
    images = {plan.split: split_images for plan, split_images in splits}
    prepare_glove_splits(out, [plan for plan, _ in splits],
                         lambda plan: lambda i: Image.fromarray(images[plan.split][i]), glove_path, "uniform", seed)
