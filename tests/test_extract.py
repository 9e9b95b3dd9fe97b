"""Feature extraction: batched == one image at a time, the cache files, and refusal of unfit checkpoints."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dataloader.datasets import SPLITS, feature_path, load_features, load_images
from dataloader.transforms import normalization
from models import build_backbone
from trainer import extract
from trainer.checkpoint import save_checkpoint
from trainer.extract import ensure_features, extract_features
from utils import InputError

MEAN_STD = normalization("res12")


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("res12")


@pytest.fixture()
def data_root(tiny_image_root, tmp_path):
    """A private copy: extraction writes into the data root."""
    root = tmp_path / "data"
    shutil.copytree(tiny_image_root, root)
    return root


@pytest.mark.slow
def test_batched_features_equal_one_at_a_time(backbone, tiny_image_root):
    images, _ = load_images(tiny_image_root, "mini", "val")
    backbone.train()
    batched = extract_features(backbone, images[:4], *MEAN_STD, "cpu", batch_size=4, progress=False)
    single = extract_features(backbone, images[:4], *MEAN_STD, "cpu", batch_size=1, progress=False)
    assert batched.shape == (4, 640) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert backbone.training, "the caller's train mode must be restored"


@pytest.mark.slow
def test_ensure_features_writes_every_split_once(backbone, data_root, tmp_path, monkeypatch):
    weights = tmp_path / "res12.pth"
    save_checkpoint(weights, backbone.state_dict(), kind="backbone", model_type="res12")
    paths = ensure_features(data_root, "mini", "res12", weights, "cpu", batch_size=8)
    assert set(paths) == set(SPLITS)
    for split in SPLITS:
        images, targets = load_images(data_root, "mini", split)
        cached = load_features(data_root, "mini", "res12", split)
        assert cached.features.shape == (len(images), 640) and cached.features.dtype == torch.float32
        assert torch.equal(cached.targets, torch.from_numpy(targets))
    # rows keep the image order
    images, _ = load_images(data_root, "mini", "test")
    direct = extract_features(backbone, images[-2:], *MEAN_STD, "cpu", progress=False)
    torch.testing.assert_close(load_features(data_root, "mini", "res12", "test").features[-2:], direct,
                               rtol=1e-4, atol=1e-4)
    # a complete cache is used as it is, without reading the checkpoint
    monkeypatch.setattr(extract, "extract_splits", lambda *a, **k: pytest.fail("re-extracted"))
    assert ensure_features(data_root, "mini", "res12", tmp_path / "absent.pth", "cpu") == paths


def mismatched_checkpoints(backbone, tmp_path):
    state = backbone.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.0.conv3")}
    resized = dict(state, **{"layer1.0.conv1.weight": torch.zeros(32, 3, 3, 3)})
    cases = {"missing": (missing, {}), "resized": (resized, {}), "meta": (state, {"kind": "meta"}),
             "wrn28": (build_backbone("wrn28").state_dict(), {})}
    for name, (params, meta) in cases.items():
        save_checkpoint(tmp_path / f"{name}.pth", params, **meta)
    return {name: tmp_path / f"{name}.pth" for name in cases}


@pytest.mark.slow
def test_unfit_checkpoints_are_refused_before_writing(backbone, data_root, tmp_path, capsys):
    expected = {"missing": "1 missing: layer4.0.conv3.weight", "resized": "of another shape",
                "meta": "this is a meta checkpoint", "wrn28": "does not fit ResNet12"}
    for name, path in mismatched_checkpoints(backbone, tmp_path).items():
        with pytest.raises(InputError, match=expected[name]):
            ensure_features(data_root, "mini", "res12", path, "cpu")
        with pytest.raises(SystemExit) as exit_:
            extract.main(["--data_root", str(data_root), "--init_weights", str(path), "--device", "cpu"])
        assert exit_.value.code == 2
        assert expected[name] in capsys.readouterr().err
    with pytest.raises(InputError, match="no backbone checkpoint"):
        ensure_features(data_root, "mini", "res12", None, "cpu")
    assert not any(feature_path(data_root, "mini", "res12", s).exists() for s in SPLITS)


@pytest.mark.slow
def test_extract_command_reads_a_whole_model_checkpoint_and_skips_cached_splits(backbone, data_root, tmp_path, capsys):
    weights = tmp_path / "ckpt.pth"
    # the original's whole-model format: backbone under `encoder.`, plus the classifier
    save_checkpoint(weights, {**{f"encoder.{k}": v for k, v in backbone.state_dict().items()},
                              "pre_fc.0.weight": torch.zeros(4, 640)})
    argv = ["--data_root", str(data_root), "--init_weights", str(weights), "--splits", "val", "--device", "cpu"]
    extract.main(argv)
    path = feature_path(data_root, "mini", "res12", "val")
    assert path.is_file() and not feature_path(data_root, "mini", "res12", "test").exists()
    with np.load(path) as npz:
        assert str(npz["source"]) == str(weights)
    extract.main(argv)
    assert "already extracted" in capsys.readouterr().out
