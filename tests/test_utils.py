"""Atomic writes, the JSON-lines log, statistics, seeding, paths."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils import JsonlLog, atomic_write, mean_ci95, resolve_device, resolve_path, save_json, set_seed, REPO_ROOT


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "f.json"
    save_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write('{"v": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_jsonl_log_resumes_after_truncating_later_epochs(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    for epoch in range(1, 4):
        log.append({"epoch": epoch, "loss": 1.0 / epoch})
    resumed = JsonlLog(tmp_path / "log.jsonl")
    resumed.truncate_after("epoch", 2)
    resumed.append({"epoch": 3, "loss": 0.1})
    assert [r["epoch"] for r in JsonlLog(tmp_path / "log.jsonl").records()] == [1, 2, 3]
    assert JsonlLog(tmp_path / "log.jsonl", keep_existing=False).records() == []


def test_mean_ci95_is_1_96_population_std_over_sqrt_n():
    """By hand: population std of (0.5, 0.7, 0.6, 0.8) is sqrt(0.0125) = 0.1118; 1.96 * 0.1118 / sqrt(4) = 0.10957."""
    mean, ci = mean_ci95(np.array([0.5, 0.7, 0.6, 0.8]))
    assert mean == pytest.approx(0.65)
    assert ci == pytest.approx(0.1095673309, rel=1e-9)


def test_set_seed_repeats_draws():
    set_seed(3)
    a = (torch.rand(3), np.random.rand(3))
    set_seed(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_relative_paths_resolve_under_the_repo_and_cpu_device_is_cpu():
    assert resolve_path("data") == REPO_ROOT / "data"
    assert resolve_path("/abs/x").as_posix() == "/abs/x"
    assert resolve_device("cpu").type == "cpu"


def test_threads_flag_sets_torch_threads_and_refuses_negatives():
    from utils import InputError

    before = torch.get_num_threads()
    try:
        assert resolve_device("cpu", threads=1).type == "cpu" and torch.get_num_threads() == 1
        resolve_device("cpu", threads=0)                     # 0 leaves the current setting
        assert torch.get_num_threads() == 1
        with pytest.raises(InputError, match="--threads must be >= 0"):
            resolve_device("cpu", threads=-2)
    finally:
        torch.set_num_threads(before)
