"""Turn a raw benchmark download into the files the loaders read.

    python -m dataloader.prepare mini     --raw DIR --glove glove.840B.300d.txt --out data/mini
    python -m dataloader.prepare tiered   --raw DIR --glove glove.840B.300d.txt --out data/tiered
    python -m dataloader.prepare cifar_fs --raw DIR --glove glove.840B.300d.txt --out data/cifar_fs
    python -m dataloader.prepare cub      --raw CUB_200_2011 --out data/cub
    python -m dataloader.prepare folder   --raw DIR --glove glove.840B.300d.txt --out data/<name>

For each split (train, val, test) it writes into ``--out``:
    few-shot-<split>.npz          features uint8 (N, 84, 84, 3) RGB (tiered --channel_order bgr: BGR),
                                  targets int64 (N,) labels 0..C-1
    few-shot-wordemb-<split>.npz  features float32 (C, D): row c is the semantic vector of label c
    classes-<split>.txt           one line per label: class id <TAB> class name

Rules shared by the datasets (``folder``, your own classes: see :mod:`dataloader.prepare.folder`):
- Images: centre square crop of the shortest side, bilinear resize to 84x84 with PIL (the original used the
  removed ``scipy.misc.imresize``); images already 84x84 are stored as decoded.
- Labels: classes of a split in sorted id order (wnids, CIFAR fine-label names, CUB official ids, folder
  names), except tieredImageNet, whose pickle release has no wnids: its labels keep the release's
  ``label_specific`` order.
- Samples: each split lists its samples in the raw order (the csv rows for mini, the pickle order for tiered
  and CIFAR-FS, CIFAR-100 train then test, CUB and folder class by class in file-name order) and stores them
  permuted by ``np.random.RandomState(seed).permutation(N)``: stored sample i is raw sample ``order[i]``. The
  permutation is applied while decoding, so the large tieredImageNet array is never copied.
- Semantic vectors: the mean GloVe vector of the words of the class name (see ``dataloader.glove``), with
  zeros (mini) or U(-1, 1) (tiered, CIFAR-FS; one ``RandomState(seed)`` drawn in split order) when no word
  is found (one warning lists those classes); CUB uses its 312 class attributes instead.

Deliberate differences from the original release:
- CIFAR-FS images (32x32) are upsampled bilinearly to 84x84 here, so that every dataset's npz holds
  (N, 84, 84, 3) and the loaders need no dataset-specific branch. The original stored 32x32 and resized in
  the loader (Resize 92 -> CenterCrop 84), so CIFAR-FS pixels reach the network through a different
  interpolation path.
- tieredImageNet PNGs are decoded with PIL into RGB, like every other dataset. The original decoded them with
  OpenCV, so its tiered arrays hold BGR images (normalised later with RGB statistics) and a backbone it trained
  on tieredImageNet expects BGR input: ``--channel_order bgr`` stores that order, to evaluate such a backbone.
- Pickles are read with an unpickler that rebuilds only NumPy arrays and builtin containers: a downloaded
  pickle cannot run code.

Bad raw input (a missing split file or image, an unreadable image, a class without a name, an attribute
table of the wrong shape, ...) raises ``utils.InputError`` naming the file, before the long work where the
check is cheap. Memory: tieredImageNet's train split needs its pickle (~4 GB) plus the decoded array
(448,695 x 84 x 84 x 3 bytes, 9.5 GB) in RAM at once.

Modules: ``common`` (split plan, image decoding and resizing, shuffled split writing, GloVe vectors),
``pickles`` (the safe unpickler), one module per dataset (``mini``, ``tiered``, ``cifar_fs``, ``cub``,
``folder``);
this one holds the command line and :func:`prepare`, which dispatches to them.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from dataloader.prepare.cifar_fs import CIFAR100_FINE_NAMES, prepare_cifar_fs
from dataloader.prepare.common import (DEFAULT_SEED, IMAGE_SIZE, SPLITS, SplitPlan, log, require_file, to_84,
                                       write_split)
from dataloader.prepare.cub import prepare_cub
from dataloader.prepare.folder import prepare_folder
from dataloader.prepare.mini import prepare_mini
from dataloader.prepare.pickles import load_pickle
from dataloader.prepare.tiered import CHANNEL_ORDERS, prepare_tiered
from utils import InputError, resolve_path

__all__ = ["DATASETS", "DEFAULT_SEED", "IMAGE_SIZE", "SPLITS", "CIFAR100_FINE_NAMES", "SplitPlan", "load_pickle",
           "to_84", "write_split", "parse_args", "prepare", "main"]

DATASETS = ("mini", "tiered", "cifar_fs", "cub", "folder")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m dataloader.prepare``."""
    parser = argparse.ArgumentParser(
        prog="python -m dataloader.prepare",
        description="Prepare a raw few-shot benchmark download into few-shot-<split>.npz, "
                    "few-shot-wordemb-<split>.npz and classes-<split>.txt.")
    parser.add_argument("dataset", choices=DATASETS, help="which benchmark the raw folder holds")
    parser.add_argument("--raw", required=True,
                        help="raw download: mini: images/ or images.zip + <split>.csv + "
                             "mini_imagenet_class_label_dict3.txt; tiered: <split>_images_png.pkl + "
                             "<split>_labels.pkl; cifar_fs: CIFAR_FS_<split>.pickle or cifar-100-python/; "
                             "cub: the CUB_200_2011 folder; folder: train/, val/ and test/, each with one "
                             "sub-folder of images per class, and optionally classes.txt ('folder name' lines)")
    parser.add_argument("--glove", default=None,
                        help="GloVe text file, e.g. glove.840B.300d.txt (required except for cub)")
    parser.add_argument("--out", default=None,
                        help="dataset folder to write (default: data/<dataset>)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the per-split sample shuffle and of the U(-1,1) fallback vectors")
    parser.add_argument("--channel_order", choices=CHANNEL_ORDERS, default="rgb",
                        help="tiered only: channel order of the stored images. rgb (default) for everything "
                             "trained with this code; bgr to evaluate a backbone that the original TasNet code "
                             "trained on tieredImageNet (it decoded the PNGs with OpenCV, so that backbone saw "
                             "BGR images normalised with RGB statistics)")
    parser.add_argument("--way", type=int, default=5,
                        help="folder only: refuse a split with fewer classes than the episodes' way")
    parser.add_argument("--split_dir", default=None,
                        help="cifar_fs from CIFAR-100 only: folder with train.json/val.json/test.json "
                             "(default: --raw)")
    return parser.parse_args(argv)


def prepare(dataset: str, raw: Path, out: Path, glove: Path | None = None, seed: int = DEFAULT_SEED,
            split_dir: Path | None = None, channel_order: str = "rgb", way: int = 5) -> None:
    """Prepare ``dataset`` from the raw folder ``raw`` into the dataset folder ``out``.

    ``channel_order`` (``rgb`` or ``bgr``) applies to tiered only; ``bgr`` for another dataset is refused.
    ``way``: folder only, the fewest classes a split may have.
    """
    if channel_order != "rgb" and dataset != "tiered":
        raise InputError(f"--channel_order {channel_order} applies to tiered only (the original decoded only "
                         f"tieredImageNet with OpenCV); {dataset} is always stored RGB")
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
    elif dataset == "folder":
        prepare_folder(raw, out, glove, seed, way)
    elif dataset == "tiered":
        prepare_tiered(raw, out, glove, seed, channel_order)
    else:
        prepare_cifar_fs(raw, out, glove, seed, split_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        prepare(args.dataset, resolve_path(args.raw), resolve_path(args.out or f"data/{args.dataset}"),
                None if args.glove is None else resolve_path(args.glove), args.seed,
                None if args.split_dir is None else resolve_path(args.split_dir), args.channel_order, args.way)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s prepared in %.1f s", args.dataset, time.perf_counter() - start)
    return 0

