"""Pretraining: the schedule, the run folder, resume, Ctrl-C, DDP on CPU, over-fitting, the entry scripts.

ResNet-12 is heavy on a CPU, so the runs here are a batch or two of two images on tiny synthetic data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import run_pre
from dataloader.datasets import SPLITS, load_features, load_images
from dataloader.prepare import write_split
from models import build_backbone
from trainer import pre
from trainer.checkpoint import load_checkpoint, load_weights
from trainer.extract import ensure_features
from trainer.runs import step_lr
from utils import REPO_ROOT
from utils.distributed import Processes
from utils.interrupt import StopRequest

TINY = ["--device", "cpu", "--pre_batch_size", "2", "--max_train_batches", "1", "--way", "2", "--shot", "1",
        "--val_query", "1", "--val_episodes", "3", "--pre_lr", "0.01"]


def tiny_args(data_root, run_dir, *extra: str):
    return run_pre.parse_args(["--data_root", str(data_root), "--run_dir", str(run_dir), *TINY, *extra])


def test_step_lr_steps_by_gamma_at_epochs_30_60_90():
    assert [step_lr(0.1, 0.2, 30, e) for e in (1, 29, 30, 59, 60, 90, 110)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008])


def test_training_loop_follows_the_schedule(tiny_image_root, tmp_path, monkeypatch):
    """The real optimizer's lr in each of the 110 epochs of the loop (training and validation skipped)."""
    defaults = run_pre.parse_args([])
    assert (defaults.pre_max_epoch, defaults.pre_lr, defaults.pre_gamma, defaults.pre_step_size) == (110, 0.1, 0.2, 30)
    assert (defaults.pre_batch_size, defaults.pre_custom_momentum, defaults.pre_custom_weight_decay) == (128, 0.9, 5e-4)
    args = tiny_args(tiny_image_root, tmp_path, "--pre_lr", "0.1", "--pre_max_epoch", "110")
    trainer = pre.Pretrainer(args, torch.device("cpu"), Processes())
    seen = []
    monkeypatch.setattr(trainer, "train_epoch",
                        lambda epoch, stop: seen.append(trainer.optimizer.param_groups[0]["lr"]) or (0.0, 0.0))
    monkeypatch.setattr(trainer, "end_epoch", lambda epoch, *a: setattr(trainer, "epoch", epoch))
    assert trainer.fit()["epochs"] == 110
    assert seen == pytest.approx([step_lr(0.1, 0.2, 30, e) for e in range(1, 111)], rel=1e-12)


@pytest.mark.slow
def test_pretraining_on_real_images_writes_the_run_folder_and_usable_checkpoints(prepared_mini, tmp_path, monkeypatch):
    """The Done-when run on a few real miniImageNet images: run folder, checkpoints, then features."""
    root = tmp_path / "data"
    for split in SPLITS:  # 2 classes x 2 images per split keeps ResNet-12 quick on a CPU
        images, targets = load_images(prepared_mini, "mini", split)
        keep = np.concatenate([np.flatnonzero(targets == c)[:2] for c in range(2)])
        write_split(root / "mini", split, images[keep], targets[keep], np.zeros((2, 4), np.float32), ["a", "b"])
    monkeypatch.setattr(pre, "SAVE_EVERY", 1)
    run_dir = tmp_path / "run"
    run_pre.main(["--data_root", str(root), "--run_dir", str(run_dir), *TINY, "--pre_max_epoch", "1",
                  "--val_episodes", "4"])
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "log.jsonl", "curves.png", "max_acc.pth",
                                                   "last.pth", "epoch-1.pth"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["pre_max_epoch"] == 1 and config["model_type"] == "res12" and "git_commit" in config
    (record,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert {"epoch", "lr", "train_loss", "train_acc", "val_acc", "time"} <= set(record)
    assert record["lr"] == 0.01 and 0 <= record["val_acc"] <= 1

    best = load_checkpoint(run_dir / "max_acc.pth")
    assert set(best["params"]) == set(build_backbone("res12").state_dict())  # drop-in {'params': backbone}
    assert best["kind"] == "backbone" and best["epoch"] == 1
    load_weights(build_backbone("res12"), run_dir / "max_acc.pth", kind="backbone")
    ensure_features(root, "mini", "res12", run_dir / "max_acc.pth", "cpu")
    for split in SPLITS:
        assert load_features(root, "mini", "res12", split).features.shape == (4, 640)


@pytest.mark.slow
def test_loss_goes_down_when_over_fitting(tmp_path):
    """Two images, no augmentation, the same batch every step: the training loss must fall."""
    images = np.random.default_rng(1).integers(0, 256, size=(2, 84, 84, 3), dtype=np.uint8)
    for split in SPLITS:  # the validation episodes (1 shot, 1 query) need two images per class
        copies = 1 if split == "train" else 2
        write_split(tmp_path / "mini", split, np.tile(images, (copies, 1, 1, 1)), np.tile([0, 1], copies),
                    np.zeros((2, 4), np.float32), ["a", "b"])
    args = tiny_args(tmp_path, tmp_path / "run", "--augment", "none")
    torch.manual_seed(0)
    trainer = pre.Pretrainer(args, torch.device("cpu"), Processes())
    losses = []
    for epoch in range(1, 5):
        losses.append(trainer.train_epoch(epoch, StopRequest())[0])
    assert losses[-1] < 0.25 * losses[0] and losses[-1] == min(losses), losses


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes_logs_once_from_rank_0(tiny_image_root, tmp_path):
    """torchrun, 2 processes, gloo: one tiny epoch; rank 0 alone writes the run folder."""
    run_dir = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "run_pre.py"), "--data_root", str(tiny_image_root), "--run_dir", str(run_dir),
               *TINY, "--pre_batch_size", "4", "--pre_max_epoch", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    assert done.stdout.count("epoch 1:") == 1  # only rank 0 reports
    load_weights(build_backbone("res12"), run_dir / "last.pth", kind="backbone")


def test_pre_batch_size_must_split_over_processes(tiny_image_root, tmp_path):
    args = tiny_args(tiny_image_root, tmp_path, "--pre_batch_size", "3")
    with pytest.raises(pre.InputError, match="divisible by the number of processes"):
        pre.Pretrainer(args, torch.device("cpu"), Processes(rank=0, world_size=2))


def test_entry_script_input_errors_exit_2_without_traceback(tmp_path, capsys):
    for argv, message in ((["--data_root", str(tmp_path), "--run_dir", str(tmp_path / "r")], "dataset folder not found"),
                          (["--resume"], "--resume needs --run_dir")):
        with pytest.raises(SystemExit) as exit_:
            run_pre.main([*argv, "--device", "cpu"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err




def test_resume_refuses_changed_recipe_flags_and_allows_more_epochs(tiny_image_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_pre.main(["--data_root", str(tiny_image_root), "--run_dir", str(run_dir), *TINY, "--model_type", "conv4",
                  "--pre_max_epoch", "1"])
    with pytest.raises(SystemExit) as exit_:
        run_pre.main(["--data_root", str(tiny_image_root), "--run_dir", str(run_dir), *TINY, "--model_type", "conv4",
                      "--pre_max_epoch", "2", "--resume", "--pre_lr", "0.5"])
    assert exit_.value.code == 2 and "--pre_lr 0.01 -> 0.5" in capsys.readouterr().err
    run_pre.main(["--data_root", str(tiny_image_root), "--run_dir", str(run_dir), *TINY, "--model_type", "conv4",
                  "--pre_max_epoch", "2", "--resume"])
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 2
