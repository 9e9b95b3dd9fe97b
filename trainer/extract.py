"""Backbone feature extraction: ``data/<dataset>/<model_type>/feat-<split>.npz`` from a backbone checkpoint.

The meta stage trains on these cached 640-d features. They are computed in eval mode from the
eval transform (Resize 92, CenterCrop 84, Normalize), in batches; the rows keep the order of
``few-shot-<split>.npz``. The checkpoint must fit the backbone exactly (:func:`trainer.checkpoint.load_weights`
refuses anything else), so features are never extracted from random weights.

Command (replaces the original ``genfeat.py``, which wrote to ``/data`` and did one split per run)::

    python -m trainer.extract --dataset mini --model_type res12 --init_weights checkpoints/mini/res12.pth
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dataloader.batch_augment import eval_transform
from dataloader.datasets import (SPLITS, FeatureSplit, feature_path, load_features, load_images,
                                 prepare_hint)
from dataloader.transforms import normalization
from models import build_backbone
from trainer.checkpoint import load_weights
from trainer.flags import add_data_flags, add_init_weights_flag
from utils import InputError, resolve_device, resolve_path, save_npz
from utils.cli import add_device_flags, run_cli
from utils.runtime import autocast

log = logging.getLogger(__name__)


def default_weights(dataset: str, model_type: str) -> Path:
    """Where a pretrained backbone lives by default: ``checkpoints/<dataset>/<model_type>.pth``."""
    return resolve_path("checkpoints") / dataset / f"{model_type}.pth"


def extract_features(backbone: nn.Module, images, mean: Sequence[float], std: Sequence[float],
                     device: torch.device | str, batch_size: int = 256, channels_last: bool = False,
                     amp: bool = False, progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Features of uint8 images, in eval mode, through the eval transform, in batches.

    Args:
        backbone: (B, 3, 84, 84) -> (B, F) module; its train/eval mode is restored afterwards.
        images: (N, H, W, 3) uint8, a numpy array or a tensor on any device.
        mean, std: the backbone's input normalisation.
        channels_last, amp: feed channels_last inputs / run under bf16 autocast (CUDA speed-ups).
    Returns:
        (N, F) float32 features on the CPU, in the order of ``images``.
    """
    device = torch.device(device)
    images = torch.as_tensor(images)
    if images.device.type == "cpu" and device.type == "cuda" and not images.is_pinned():
        images = images.pin_memory()  # lets each batch copy overlap with the previous batch's compute
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        with torch.inference_mode(), autocast(device, amp):
            for batch in tqdm(images.split(batch_size), desc=desc, unit="batch", disable=not progress,
                              leave=False, dynamic_ncols=True):
                inputs = eval_transform(batch.to(device, non_blocking=True), mean, std,
                                        channels_last=channels_last)
                chunks.append(backbone(inputs).float().cpu())
    finally:
        backbone.train(was_training)
    if not chunks:
        return torch.zeros(0, getattr(backbone, "out_dim", 640))
    return torch.cat(chunks)


def missing_splits(data_root, dataset: str, model_type: str, splits: Sequence[str] = SPLITS) -> list[str]:
    """The splits whose ``feat-<split>.npz`` is absent."""
    return [s for s in splits if not feature_path(data_root, dataset, model_type, s).is_file()]


def extract_splits(backbone: nn.Module, data_root, dataset: str, model_type: str, device: torch.device,
                   splits: Sequence[str] = SPLITS, batch_size: int = 256, source: str = "") -> dict[str, Path]:
    """Write ``feat-<split>.npz`` (features float32 (N, F), targets (N,)) for every split in ``splits``.

    Args:
        backbone: loaded weights, on ``device``.
        source: recorded in the file (the checkpoint the features come from).
    Returns:
        split -> path written.
    """
    mean, std = normalization(model_type)
    written = {}
    for split in splits:
        images, targets = load_images(data_root, dataset, split)
        features = extract_features(backbone, images, mean, std, device, batch_size,
                                    desc=f"{dataset} {split} features")
        path = feature_path(data_root, dataset, model_type, split)
        save_npz(path, features=features.numpy(), targets=targets, source=np.array(str(source)))
        log.info("wrote %s: %s features", path, tuple(features.shape))
        written[split] = path
    return written


def ensure_features(data_root, dataset: str, model_type: str, init_weights, device: torch.device | str,
                    batch_size: int = 256) -> dict[str, Path]:
    """Make sure ``<data_root>/<dataset>/<model_type>/feat-{train,val,test}.npz`` exist; extract the missing.

    Existing files are kept as they are (the cache is keyed by dataset and backbone, as in the original):
    delete them, or run ``python -m trainer.extract --overwrite``, after changing the backbone checkpoint.

    Args:
        init_weights: the backbone checkpoint; only read when a split is missing. A checkpoint whose keys
            or shapes do not fit ``model_type`` raises :class:`InputError` before anything is written.
    Returns:
        split -> feature file.
    """
    device = torch.device(device)
    missing = missing_splits(data_root, dataset, model_type)
    if missing:
        if init_weights is None:
            raise InputError(f"no cached features for {dataset}/{model_type} ({', '.join(missing)} missing) and "
                             f"no backbone checkpoint to extract them from; pass --init_weights.")
        backbone = load_backbone(model_type, init_weights, device)
        log.info("extracting %s features of %s with %s", model_type, dataset, init_weights)
        extract_splits(backbone, data_root, dataset, model_type, device, missing, batch_size, str(init_weights))
    return {s: feature_path(data_root, dataset, model_type, s) for s in SPLITS}


def load_backbone(model_type: str, weights, device: torch.device) -> nn.Module:
    """A ``model_type`` backbone on ``device`` with the checked weights of the backbone checkpoint ``weights``."""
    path = resolve_path(weights)
    backbone = build_backbone(model_type).to(device)
    load_weights(backbone, path, map_location=device, kind="backbone")
    return backbone


def load_feature_splits(args: argparse.Namespace, splits: Sequence[str], device: torch.device) -> dict[str, FeatureSplit]:
    """The cached feature splits on ``device``, extracted from the backbone checkpoint first when missing.

    Args:
        args: ``data_root``, ``dataset``, ``model_type``, ``init_weights`` and ``extract_batch_size`` (the meta
            stage's flags).
    """
    missing = [s for s in splits if not feature_path(args.data_root, args.dataset, args.model_type, s).is_file()]
    if missing:
        weights = resolve_path(args.init_weights) if args.init_weights else default_weights(args.dataset,
                                                                                            args.model_type)
        if not weights.is_file():
            folder = feature_path(args.data_root, args.dataset, args.model_type, missing[0]).parent
            images = folder.parent / "few-shot-train.npz"
            prepare = "" if images.is_file() else (f" First prepare the images ({images} is missing). "
                                                   f"{prepare_hint(args.dataset, folder.parent)}.")
            raise InputError(
                f"{folder}: no cached features for split(s) {', '.join(missing)}, and no backbone checkpoint at "
                f"{weights} to extract them from.{prepare} Pretrain one with: python run_pre.py --dataset "
                f"{args.dataset} "
                f"--model_type {args.model_type} --data_root {args.data_root} (then copy its max_acc.pth to "
                f"{weights}, or pass it as --init_weights), or extract the features yourself with: python -m "
                f"trainer.extract --dataset {args.dataset} --model_type {args.model_type} --data_root "
                f"{args.data_root} --init_weights <backbone checkpoint>.")
        print(f"extracting {args.model_type} features of {args.dataset} ({', '.join(missing)}) from {weights}")
        ensure_features(args.data_root, args.dataset, args.model_type, weights, device, args.extract_batch_size)
    loaded = {s: load_features(args.data_root, args.dataset, args.model_type, s).to(device) for s in splits}
    dims = {s: (tuple(loaded[s].features.shape[1:]), loaded[s].class_vectors.shape[1]) for s in splits}
    if len(set(dims.values())) > 1:
        raise InputError(f"{args.dataset}/{args.model_type}: the splits disagree on the feature or class-vector "
                         f"size ((feature shape, D) per split: {dims}); re-create them with one backbone and one "
                         f"word-vector file.")
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract backbone features of every split into "
                                                 "data/<dataset>/<model_type>/feat-<split>.npz.")
    add_data_flags(parser)
    add_init_weights_flag(parser, "whose features are extracted")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to extract")
    parser.add_argument("--overwrite", action="store_true", help="re-extract splits whose file already exists")
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    add_device_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def extract_command(args: argparse.Namespace) -> None:
    """``python -m trainer.extract``: extract the splits that are missing (all of them with --overwrite)."""
    device = resolve_device(args.device, args.threads)
    weights = resolve_path(args.init_weights or default_weights(args.dataset, args.model_type))
    splits = args.splits if args.overwrite else missing_splits(args.data_root, args.dataset, args.model_type,
                                                               args.splits)
    if not splits:
        print(f"features already extracted for {args.splits}; --overwrite to redo them")
        return
    backbone = load_backbone(args.model_type, weights, device)
    for split, path in extract_splits(backbone, args.data_root, args.dataset, args.model_type, device, splits,
                                      args.batch_size, str(weights)).items():
        print(f"{split}: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(extract_command, parse_args(argv), batch_flag="--batch_size")


if __name__ == "__main__":
    main()
