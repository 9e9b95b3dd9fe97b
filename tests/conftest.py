"""Fixtures shared by the test files.

Real data lives beside the project in ``../shared/data`` (see its README); a fresh clone has none, so every
fixture that needs it skips the test instead of failing. The prepared datasets are session-scoped: each is
built once per test run and reused by every test file that asks for it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The release's reference outputs (backbone state-dict keys and seeded outputs, meta-head episodes)
REFERENCE_DIR = Path(os.environ.get("TASNET_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


def _shared(*parts: str) -> Path:
    """``../shared/data/<parts>``, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the real data in ../shared/data")
    return path


def _prepare(tmp_path_factory: pytest.TempPathFactory, dataset: str, *args: str) -> Path:
    """Run ``python -m dataloader.prepare`` (in-process) into a fresh folder; return the data root."""
    from dataloader.prepare import main

    root = tmp_path_factory.mktemp(f"prepared-{dataset}")
    assert main([dataset, *args, "--out", str(root / dataset)]) == 0, f"preparing {dataset} failed"
    return root


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of the release's reference outputs ($TASNET_REFERENCE; skips when absent)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"{REFERENCE_DIR} not found: set TASNET_REFERENCE to the release's reference outputs")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder ``../shared/data`` (skips when absent)."""
    return _shared()


@pytest.fixture(scope="session")
def prepared_mini(tmp_path_factory) -> Path:
    """Data root holding ``mini/``: the shared miniImageNet cut (7680/1920/2400 images), 50-d GloVe 6B."""
    return _prepare(tmp_path_factory, "mini", "--raw", str(_shared("mini-imagenet")),
                    "--glove", str(_shared("glove", "glove.6B.50d.subset.txt")))


@pytest.fixture(scope="session")
def prepared_cub(tmp_path_factory) -> Path:
    """Data root holding ``cub/``: the shared CUB cut (100 of 200 classes, 20 images each), 312-d attributes."""
    return _prepare(tmp_path_factory, "cub", "--raw", str(_shared("cub", "CUB_200_2011")))


@pytest.fixture(scope="session")
def tiny_image_root(tmp_path_factory) -> Path:
    """Data root holding ``mini/``: a few synthetic 84x84 images per class (train 4 classes x 3 images,
    val and test 3 x 3), each class a distinct colour with noise. For tests that run a backbone on a CPU."""
    import numpy as np

    from dataloader.prepare import write_split

    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for split, (classes, per_class) in {"train": (4, 3), "val": (3, 3), "test": (3, 3)}.items():
        colours = rng.uniform(0, 255, size=(classes, 1, 1, 1, 3))
        noise = rng.normal(0, 40, size=(classes, per_class, 84, 84, 3))
        images = np.clip(colours + noise, 0, 255).astype(np.uint8).reshape(-1, 84, 84, 3)
        targets = np.repeat(np.arange(classes), per_class)
        order = rng.permutation(len(targets))
        write_split(root / "mini", split, images[order], targets[order],
                    rng.normal(size=(classes, 4)).astype(np.float32), [f"{split}{c}" for c in range(classes)])
    return root
