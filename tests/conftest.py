"""Fixtures shared by the test files.

Tests that need real data find it through two environment variables; a fresh clone has neither folder, so
every test that needs one skips instead of failing:

- ``TASNET_DATA``: the raw benchmark cuts (``mini-imagenet/``, ``cub/``, ``cifar-fs/``, ``tiered-imagenet/``)
  and ``glove/``; default ``../shared/data`` relative to the repository.
- ``TASNET_REFERENCE``: outputs of the original release to compare with (state-dict listings, seeded forward
  passes); default ``../shared/reference`` relative to the repository.

A relative value of either variable is taken relative to the working directory (both are resolved in
synthetic_data.py, which test files import; they never import this file). The prepared datasets are
session-scoped: each is built once per test run and reused by every test file that asks for it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from synthetic_data import DATA_DIR, REFERENCE_DIR
from utils import runtime


@pytest.fixture(scope="session", autouse=True)
def keep_freed_memory():
    """What every command does on a CPU (``utils.resolve_device``), from the first test on: the tests' training
    steps reuse freed memory instead of faulting it back in."""
    runtime.keep_freed_memory()


def _real(*parts: str) -> Path:
    """``$TASNET_DATA/<parts>``, or skip the test when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs the real data (set TASNET_DATA)")
    return path


def _prepare(tmp_path_factory: pytest.TempPathFactory, dataset: str, *args: str) -> Path:
    """Run ``python -m dataloader.prepare`` (in-process) into a fresh folder; return the data root."""
    from dataloader.prepare import main

    root = tmp_path_factory.mktemp(f"prepared-{dataset}")
    assert main([dataset, *args, "--out", str(root / dataset)]) == 0, f"preparing {dataset} failed"
    return root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder ``$TASNET_DATA`` (skips when absent)."""
    return _real()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of the original release's reference outputs, ``$TASNET_REFERENCE`` (skips when absent)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"{REFERENCE_DIR} not found: this test needs the reference outputs (set TASNET_REFERENCE)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def prepared_mini(tmp_path_factory) -> Path:
    """Data root holding ``mini/``: the miniImageNet cut of ``$TASNET_DATA`` (7680/1920/2400 images), 50-d GloVe 6B."""
    return _prepare(tmp_path_factory, "mini", "--raw", str(_real("mini-imagenet")),
                    "--glove", str(_real("glove", "glove.6B.50d.subset.txt")))


@pytest.fixture(scope="session")
def prepared_cub(tmp_path_factory) -> Path:
    """Data root holding ``cub/``: the CUB cut of ``$TASNET_DATA`` (100 of 200 classes, 20 images each), 312-d attributes."""
    return _prepare(tmp_path_factory, "cub", "--raw", str(_real("cub", "CUB_200_2011")))


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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the tensors of these tests are tiny (more threads only add
    synchronisation on a busy machine), and a run and its resumed twin then compute bit for bit the same."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
