"""What several test files share: where the real data and the reference outputs live (``TASNET_DATA``,
``TASNET_REFERENCE``, see conftest.py), and synthetic inputs: cached backbone features, a raw miniImageNet
folder, the release's checkpoint layouts."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from dataloader.prepare import SPLITS
from utils import save_npz

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env_dir(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser().resolve() if value else default


DATA_DIR = _env_dir("TASNET_DATA", REPO_ROOT.parent / "shared" / "data")
REFERENCE_DIR = _env_dir("TASNET_REFERENCE", REPO_ROOT.parent / "shared" / "reference")

DIM = 12  # class-vector size of the synthetic features


def write_synthetic(root: Path, dataset: str = "mini", model_type: str = "res12", dim: int = DIM,
                    classes=(12, 6, 8), per_class: int = 25, noise: float = 1.0, seed: int = 0) -> Path:
    """Features around one random mean per class (ReLU'd like a backbone's), class vectors a noisy linear
    image of the class means, in the prepared layout under ``root``."""
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(dim, 640)) / np.sqrt(640)
    for split, count in zip(("train", "val", "test"), classes):
        means = rng.normal(size=(count, 640))
        features = np.maximum(means[:, None] + noise * rng.normal(size=(count, per_class, 640)), 0)
        targets = np.repeat(np.arange(count), per_class)
        order = rng.permutation(len(targets))
        save_npz(root / dataset / model_type / f"feat-{split}.npz",
                 features=features.reshape(-1, 640)[order].astype(np.float32), targets=targets[order])
        vectors = means @ projection.T + 0.1 * rng.normal(size=(count, dim))
        save_npz(root / dataset / f"few-shot-wordemb-{split}.npz", features=vectors.astype(np.float32))
    return root


def make_tiny_mini(raw: Path, zipped: bool = False) -> Path:
    """A miniImageNet-style raw folder: 2 classes per split, 3 images each, and a 3-d GloVe file."""
    rng = np.random.RandomState(4)
    images = {}
    lines = []
    for split_index, split in enumerate(SPLITS):
        rows = []
        for c in range(2):
            wnid = f"n0{split_index}{c}"
            lines.append(f"{wnid} {len(lines) + 1} Red_fox" if c else f"{wnid} {len(lines) + 1} owl")
            for k in range(3):
                name = f"{wnid}{k:08d}.jpg"
                buffer = io.BytesIO()
                Image.fromarray(rng.randint(0, 256, (84, 84, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                images[name] = buffer.getvalue()
                rows.append(f"{name},{wnid}")
        (raw / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (raw / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    (raw / "mini_imagenet_class_label_dict3.txt").write_text("\n".join(lines) + "\n")
    if zipped:
        with zipfile.ZipFile(raw / "images.zip", "w") as archive:
            for name, data in images.items():
                archive.writestr(f"images/{name}", data)
    else:
        (raw / "images").mkdir()
        for name, data in images.items():
            (raw / "images" / name).write_bytes(data)
    (raw / "glove.txt").write_text("red 1 2 3\nfox 3 2 1\nowl 0 0 1\n")
    return raw


def mini_class_folders(raw: Path, classes: int = 3, images: int = 6) -> Path:
    """A raw folder for ``prepare folder`` from the real miniImageNet JPEGs of ``DATA_DIR``: ``raw/<split>/<name>/``
    holds the first ``images`` JPEGs of each of the first ``classes`` classes (by wnid) of the split's csv, the
    folder named as the class (``house_finch``)."""
    import csv
    import shutil

    source = DATA_DIR / "mini-imagenet"
    names = dict(line.split()[::2] for line in (source / "mini_imagenet_class_label_dict3.txt").read_text().splitlines()
                 if line.strip())
    for split in SPLITS:
        with open(source / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]
        for wnid in sorted({wnid for _, wnid in rows})[:classes]:
            folder = raw / split / names[wnid]
            folder.mkdir(parents=True)
            for file in [file for file, label in rows if label == wnid][:images]:
                shutil.copy(source / "images" / file, folder / file)
    return raw


def mini_args(raw: Path, out: Path) -> list[str]:
    return ["mini", "--raw", str(raw), "--glove", str(raw / "glove.txt"), "--out", str(out)]


def release_state_dict_keys(reference_file: Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of a reference state-dict list (``key<TAB>shape<TAB>dtype`` lines, ``#`` comments)."""
    shapes = {}
    for line in reference_file.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            shapes[key] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return shapes


def release_meta_params(feat_learner: dict, word_learner: dict, encoder_shapes: dict) -> dict:
    """A meta state dict in the original release's layout: an unused random ``encoder.*``, the regressor under
    ``word_learner.{fc1_w,fc1_b}`` and again as ``word_learner.vars.{0,1}``, and ``feat_learner.*``."""
    import torch

    generator = torch.Generator().manual_seed(0)
    params = {f"encoder.{key}": torch.randn(shape, generator=generator) if shape else torch.zeros((), dtype=torch.long)
              for key, shape in encoder_shapes.items()}
    weight, bias = word_learner["weight"].clone(), word_learner["bias"].clone()
    params.update({"word_learner.fc1_w": weight, "word_learner.fc1_b": bias,
                   "word_learner.vars.0": weight.clone(), "word_learner.vars.1": bias.clone()})
    params.update({f"feat_learner.{key}": value.clone() for key, value in feat_learner.items()})
    return params
