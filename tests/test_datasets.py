"""Loading the prepared npz files: every malformed file is refused with a message naming it."""
from __future__ import annotations

import numpy as np
import pytest

from dataloader import load_class_vectors, load_features, load_images
from utils import InputError, save_npz


def write_images(root, images, targets, split="train"):
    save_npz(root / "mini" / f"few-shot-{split}.npz", features=images, targets=targets)


def good_images(n=12, classes=3):
    return np.zeros((n, 84, 84, 3), np.uint8), np.arange(n) % classes


def test_well_formed_images_load_with_int64_targets(tmp_path):
    write_images(tmp_path, *good_images())
    images, targets = load_images(tmp_path, "mini", "train")
    assert images.shape == (12, 84, 84, 3) and targets.dtype == np.int64


def test_missing_dataset_folder_names_the_prepare_command(tmp_path):
    with pytest.raises(InputError, match=r"dataset folder not found.*python -m dataloader.prepare mini --raw"):
        load_images(tmp_path, "mini", "train")


def test_npz_missing_arrays_is_refused_naming_them(tmp_path):
    save_npz(tmp_path / "mini" / "few-shot-train.npz", images=np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(InputError, match=r"few-shot-train.npz: missing array\(s\) \['features', 'targets'\]"):
        load_images(tmp_path, "mini", "train")


@pytest.mark.parametrize("images", [np.zeros((4, 84, 84, 3), np.float32), np.zeros((4, 32, 32, 3), np.uint8),
                                    np.zeros((4, 3, 84, 84), np.uint8)])
def test_images_of_wrong_dtype_or_shape_are_refused(tmp_path, images):
    write_images(tmp_path, images, np.arange(4) % 2)
    with pytest.raises(InputError, match=r"must be uint8 images of shape \(N, 84, 84, 3\)"):
        load_images(tmp_path, "mini", "train")


@pytest.mark.parametrize("targets", [np.array([1, 2, 1, 2]), np.array([0, 2, 0, 2]), np.array([0., 1., 0., 1.])])
def test_targets_not_0_to_c_minus_1_are_refused(tmp_path, targets):
    write_images(tmp_path, np.zeros((4, 84, 84, 3), np.uint8), targets)
    with pytest.raises(InputError, match="targets|labels must be 0..C-1"):
        load_images(tmp_path, "mini", "train")


def test_truncated_npz_is_refused_as_truncated(tmp_path):
    write_images(tmp_path, *good_images())
    path = tmp_path / "mini" / "few-shot-train.npz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated"):
        load_images(tmp_path, "mini", "train")


def write_features(root, features, targets, vectors, split="val"):
    save_npz(root / "mini" / "res12" / f"feat-{split}.npz", features=features, targets=targets)
    save_npz(root / "mini" / f"few-shot-wordemb-{split}.npz", features=vectors)


def test_well_formed_features_load_with_their_class_vectors(tmp_path):
    write_features(tmp_path, np.ones((6, 640), np.float32), np.arange(6) % 3, np.ones((3, 50), np.float32))
    split = load_features(tmp_path, "mini", "res12", "val")
    assert split.features.shape == (6, 640) and split.class_vectors.shape == (3, 50) and split.num_classes == 3


def test_missing_features_name_the_extraction_command(tmp_path):
    (tmp_path / "mini").mkdir()
    with pytest.raises(InputError, match="feat-val.npz: file not found. Extract it with: python -m trainer.extract"):
        load_features(tmp_path, "mini", "res12", "val")


@pytest.mark.parametrize("features, message", [
    (np.ones((6, 640, 1), np.float32), "must be a 2-D float array"),
    (np.full((6, 640), np.nan, np.float32), "NaN or Inf"),
])
def test_features_not_2d_or_not_finite_are_refused(tmp_path, features, message):
    write_features(tmp_path, features, np.arange(6) % 3, np.ones((3, 50), np.float32))
    with pytest.raises(InputError, match=message):
        load_features(tmp_path, "mini", "res12", "val")


@pytest.mark.parametrize("vectors, message", [
    (np.ones((4, 50), np.float32), r"one row per class; got \(4, 50\) for a split with 3 classes"),
    (np.array([[np.inf] * 50] * 3, np.float32), "NaN or Inf"),
])
def test_class_vectors_with_wrong_row_count_or_inf_are_refused(tmp_path, vectors, message):
    save_npz(tmp_path / "mini" / "few-shot-wordemb-val.npz", features=vectors)
    with pytest.raises(InputError, match=message):
        load_class_vectors(tmp_path, "mini", "val", num_classes=3)
