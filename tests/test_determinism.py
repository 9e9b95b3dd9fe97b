"""One ``--seed`` fixes everything on a CPU: initialisation, data order and augmentation, training episodes,
validation and test episodes, transductive k-means; ``--deterministic`` turns on torch's deterministic
algorithms (for CUDA). What stays non-deterministic on CUDA is listed in docs/troubleshooting.md (Determinism).
"""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

import run_pre
from dataloader.pipelines import batch_seed, epoch_batches
from synthetic_data import write_synthetic
from trainer import meta, pre
from trainer.checkpoint import load_checkpoint
from utils import REPO_ROOT, InputError
from utils.distributed import Processes

# transductive, so that the seeded k-means is part of every validation and test episode
META = ["--device", "cpu", "--shot", "1", "--max_epoch", "2", "--num_batch", "4", "--val_episodes", "4",
        "--test_episodes", "12", "--inner_steps", "3", "--train_query", "5", "--val_query", "5", "--test_query", "5",
        "--setting", "tran", "--kmeans_n_init", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("determinism"), dim=6, classes=(8, 6, 5), per_class=12)


@pytest.fixture()
def restore_deterministic_mode(monkeypatch):
    """``--deterministic`` changes process-wide torch state: put it back for the other tests."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def fusion(root: Path, run_dir: Path, *flags: str) -> tuple[dict, dict]:
    """Run ``run_fusion.py``; return the result and the parameters of the best model."""
    parser = runpy.run_path(str(REPO_ROOT / "run_fusion.py"))["parser"]
    assert meta.cli(parser, ["--data_root", str(root), "--run_dir", str(run_dir), *META, *flags]) == 0
    return json.loads((run_dir / "result.json").read_text()), load_checkpoint(run_dir / "max_acc.pth")["params"]


@pytest.mark.slow
def test_meta_stage_repeats_itself_for_one_seed(root, tmp_path, restore_deterministic_mode):
    result, params = fusion(root, tmp_path / "a", "--seed", "3")
    again, params_again = fusion(root, tmp_path / "b", "--seed", "3", "--deterministic")
    assert torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(params[key], params_again[key]) for key in params)
    assert (again["test_acc"], again["test_ci95"], again["val_best_acc"]) == (
        result["test_acc"], result["test_ci95"], result["val_best_acc"])
    _, params_other = fusion(root, tmp_path / "c", "--seed", "4")
    assert not torch.equal(params["feat_learner.weight"], params_other["feat_learner.weight"])


def test_pretraining_data_order_comes_from_the_seed():
    """Two pretraining runs with one seed give the same weights bit for bit: test_lifecycle compares an
    uninterrupted run with one run partly in another process (and ResNet-12 is too slow on a CPU to train it
    twice more here). This checks what the seed decides: the order of the batches (and, through
    ``batch_seed``, each batch's augmentation)."""
    one = Processes()
    order = [batch.tolist() for batch in epoch_batches(40, 8, 0, 1, one)]
    assert order == [batch.tolist() for batch in epoch_batches(40, 8, 0, 1, one)]
    assert order != [batch.tolist() for batch in epoch_batches(40, 8, 1, 1, one)]
    assert order != [batch.tolist() for batch in epoch_batches(40, 8, 0, 2, one)]  # a new order every epoch
    assert batch_seed(0, 1, 0, 0) != batch_seed(1, 1, 0, 0)


def test_deterministic_flag_reaches_set_seed_in_pretraining(monkeypatch, capsys, tmp_path):
    seeds = []

    def stop(*args, **kwargs):
        raise InputError("stopped after seeding")

    monkeypatch.setattr(pre, "set_seed", lambda seed, deterministic=False: seeds.append((seed, deterministic)))
    monkeypatch.setattr(pre, "Pretrainer", stop)
    for flags, expected in (([], (7, False)), (["--deterministic"], (7, True))):
        with pytest.raises(SystemExit):
            run_pre.main(["--seed", "7", "--device", "cpu", "--run_dir", str(tmp_path / "run"), *flags])
        assert seeds.pop() == expected and "stopped after seeding" in capsys.readouterr().err
