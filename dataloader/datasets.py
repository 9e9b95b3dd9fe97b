"""The prepared npz files, loaded and checked.

``<data_root>/<dataset>/few-shot-<split>.npz``            images  uint8 (N, 84, 84, 3), targets (N,)
``<data_root>/<dataset>/few-shot-wordemb-<split>.npz``    class vectors float (C, D)
``<data_root>/<dataset>/<model_type>/feat-<split>.npz``   backbone features float (N, F), F = 640 (64: Conv-4), targets (N,)

Every loader validates what it reads and names the file in its error, so a bad file fails at start-up,
not an hour into training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.io import InputError, load_npz
from utils.runtime import resolve_path

SPLITS = ("train", "val", "test")
DATASETS = ("mini", "tiered", "cifar_fs", "cub", "demo")
IMAGE_SIZE = 84


def dataset_dir(data_root: str | Path, dataset: str) -> Path:
    """``<data_root>/<dataset>``, checked to exist (with the command that makes it when it does not)."""
    folder = resolve_path(data_root) / dataset
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found. {prepare_hint(dataset, folder)}")
    return folder


def prepare_hint(dataset: str, folder: Path) -> str:
    if dataset == "demo":
        return f"Create it with: python -m dataloader.demo --out {folder}"
    raw = {"cub": "<path to CUB_200_2011>"}.get(dataset, "<raw download folder>")
    glove = "" if dataset == "cub" else " --glove <glove.840B.300d.txt>"
    return f"Create it with: python -m dataloader.prepare {dataset} --raw {raw}{glove} --out {folder}"


def check_targets(targets: np.ndarray, path: Path) -> np.ndarray:
    """Labels must be a 1-D integer array using every label 0..C-1."""
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise InputError(f"{path}: 'targets' must be a 1-D integer array, got {targets.dtype} {targets.shape}.")
    present = np.unique(targets)
    if present.size == 0 or present[0] != 0 or present[-1] != present.size - 1:
        raise InputError(f"{path}: labels must be 0..C-1 with every label used; found {present.size} distinct "
                         f"labels between {present.min() if present.size else None} and "
                         f"{present.max() if present.size else None}. Re-run the prepare command.")
    return targets.astype(np.int64)


def load_images(data_root: str | Path, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 84, 84, 3) and labels int64 (N,) of one split."""
    folder = dataset_dir(data_root, dataset)
    path = folder / f"few-shot-{split}.npz"
    arrays = load_npz(path, ("features", "targets"), prepare_hint(dataset, folder))
    images = arrays["features"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise InputError(f"{path}: 'features' must be uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                         f"got {images.dtype} {images.shape}. Re-run the prepare command.")
    targets = check_targets(arrays["targets"], path)
    if len(targets) != len(images):
        raise InputError(f"{path}: {len(images)} images but {len(targets)} targets.")
    return images, targets


def load_class_vectors(data_root: str | Path, dataset: str, split: str, num_classes: int) -> np.ndarray:
    """Semantic vectors float32 (C, D) of one split; D comes from the file."""
    folder = dataset_dir(data_root, dataset)
    path = folder / f"few-shot-wordemb-{split}.npz"
    vectors = load_npz(path, ("features",), prepare_hint(dataset, folder))["features"]
    if vectors.ndim != 2 or vectors.shape[0] != num_classes:
        raise InputError(f"{path}: class vectors must be (C, D) with one row per class; got {vectors.shape} "
                         f"for a split with {num_classes} classes. Re-run the prepare command.")
    if not np.isfinite(vectors).all():
        raise InputError(f"{path}: class vectors contain NaN or Inf. Re-run the prepare command.")
    return vectors.astype(np.float32)


def feature_path(data_root: str | Path, dataset: str, model_type: str, split: str) -> Path:
    return resolve_path(data_root) / dataset / model_type / f"feat-{split}.npz"


@dataclass
class FeatureSplit:
    """Cached backbone features of one split with its class vectors.

    features: (N, F) float32; targets: (N,) int64; class_vectors: (C, D) float32.
    """

    features: torch.Tensor
    targets: torch.Tensor
    class_vectors: torch.Tensor
    name: str = "split"

    @property
    def num_classes(self) -> int:
        return self.class_vectors.shape[0]

    def to(self, device: torch.device | str) -> "FeatureSplit":
        return FeatureSplit(self.features.to(device), self.targets.to(device), self.class_vectors.to(device),
                            self.name)


def load_features(data_root: str | Path, dataset: str, model_type: str, split: str) -> FeatureSplit:
    """Read ``feat-<split>.npz`` and the split's class vectors, checked against each other."""
    path = feature_path(data_root, dataset, model_type, split)
    arrays = load_npz(path, ("features", "targets"),
                      "Extract it with: python -m trainer.extract --dataset "
                      f"{dataset} --model_type {model_type} --init_weights <backbone checkpoint>")
    features = arrays["features"]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{path}: 'features' must be a 2-D float array (N, F), got {features.dtype} "
                         f"{features.shape}. Delete it and extract the features again.")
    if not np.isfinite(features).all():
        raise InputError(f"{path}: features contain NaN or Inf (a diverged backbone?). Delete it and extract "
                         f"again from a sound checkpoint.")
    targets = check_targets(arrays["targets"], path)
    if len(targets) != len(features):
        raise InputError(f"{path}: {len(features)} feature rows but {len(targets)} targets.")
    num_classes = int(targets.max()) + 1
    vectors = load_class_vectors(data_root, dataset, split, num_classes)
    return FeatureSplit(torch.from_numpy(features.astype(np.float32)), torch.from_numpy(targets),
                        torch.from_numpy(vectors), name=str(path))


class ImageDataset(Dataset):
    """The images of one split with a per-image transform: the plain (PIL) path of the original.

    ``dataset[i]`` returns ``(transform(PIL image), label)``. The fast path instead keeps ``images`` as one
    uint8 tensor and augments whole batches (``dataloader.batch_augment``).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.targets[index])
