"""The bench scripts run end to end in their --quick configuration on a CPU and print one valid JSON line.

No timing is asserted (figures on a shared CPU mean nothing here): only that every path runs and reports.
The scripts are run as files (``runpy``), in this process, so the import path setup of ``python bench/x.py``
is exercised without paying for a second torch import.
"""
from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys

import pytest
import torch

from bench import print_summary
from utils import REPO_ROOT


@pytest.fixture
def run_script(capsys, monkeypatch, tmp_path):
    """Run ``bench/<name>.py`` with arguments as ``python bench/<name>.py ...``; return its parsed JSON line."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> dict:
        monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", *args])
        capsys.readouterr()
        try:
            runpy.run_path(str(REPO_ROOT / "bench" / f"{name}.py"), run_name="__main__")
        finally:
            torch.set_num_threads(threads)
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}: {lines[:3]}"
        record = json.loads(lines[0])
        # the table that bench/gpu.sh prints last reads these lines
        results = tmp_path / f"{name}.jsonl"
        results.write_text(lines[0] + "\n")
        print_summary(results)
        assert capsys.readouterr().out.startswith(f"{name} on ")
        return record

    return run


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_meta_bench_quick_reports_every_setting_and_matches_the_reference_accuracy(run_script):
    record = run_script("meta", "--quick", "--device", "cpu", "--threads", "1")
    assert record["bench"] == "meta" and record["device"] == "cpu" and len(record["load_avg"]) == 3
    settings = {(r["impl"], r["head"], r["mode"], r["phase"]) for r in record["rows"]}
    for head in ("fusion", "concat"):
        assert {("reference", head, "carry", "train"), ("reference", head, "carry", "eval")} <= settings
        assert {("ours", head, mode, phase) for mode in ("carry", "reset")
                for phase in ("train", "val", "test")} <= settings
    assert all(positive(r["episodes_per_s"]) and 0 <= r["acc"] <= 1 and positive(r["peak_mb"])
               for r in record["rows"])
    assert len(record["ratios"]) == 12 and all(positive(r["ratio"]) for r in record["ratios"])
    assert set(record["test_ratio_range"]) == {"carry", "reset"}
    # the inner loop alone: reset mode against plain_fit_regressor per episode, one pair per shot
    assert [(r["impl"], r["shot"]) for r in record["inner"]] == [("ours", 1), ("reference", 1)]
    assert positive(record["inner"][0]["ratio"]) and all(positive(r["episodes_per_s"]) for r in record["inner"])
    # the reference carries its regressor over like carry mode, from the same weights, on the same episodes
    accuracy = {(r["impl"], r["head"], r["phase"]): r["acc"] for r in record["rows"] if r["mode"] == "carry"}
    for head in ("fusion", "concat"):
        assert accuracy[("ours", head, "train")] == pytest.approx(accuracy[("reference", head, "train")], abs=1e-6)
        assert accuracy[("ours", head, "test")] == pytest.approx(accuracy[("reference", head, "eval")], abs=1e-6)


@pytest.mark.slow
def test_meta_bench_threads_apply_to_ours_and_the_reference(run_script):
    """--threads 2 runs reset mode's chunks on two workers; --ref_threads 1 times the reference on one thread."""
    record = run_script("meta", "--quick", "--device", "cpu", "--threads", "2", "--ref_threads", "1",
                        "--heads", "fusion", "--modes", "reset")
    assert [(r["impl"], r["threads"]) for r in record["inner"]] == [("ours", 2), ("reference", 1)]
    assert record["threads"] == 2 and record["config"]["ref_threads"] == 1


@pytest.mark.slow
def test_pretrain_bench_quick_reports_every_pipeline_step_and_epoch(run_script):
    record = run_script("pretrain", "--quick", "--device", "cpu", "--threads", "1")
    assert record["bench"] == "pretrain" and record["device"] == "cpu"
    assert {r["impl"] for r in record["pipeline"]} == {"pil", "batch_augment"}
    assert [(r["model"], r["precision"]) for r in record["steps"]] == [("conv4", "fp32")]
    assert [r["augment"] for r in record["epoch"]] == ["batch", "pil"]
    assert all(r["images"] == 8 for r in record["epoch"])  # the whole synthetic epoch, warm-up excluded
    assert all(positive(r["images_per_s"]) for r in record["pipeline"] + record["steps"] + record["epoch"])
    assert positive(record["ratios"]["pipeline_batch_over_pil"]) and positive(record["ratios"]["epoch_batch_over_pil"])


@pytest.mark.slow
def test_pretrain_bench_times_steps_and_epochs_with_each_allocator_in_child_processes(run_script):
    record = run_script("pretrain", "--quick", "--device", "cpu", "--threads", "1", "--parts", "allocator")
    assert [(r["malloc"], r["part"]) for r in record["allocator"]] == [
        (malloc, part) for malloc in ("default", "keep") for part in ("step", "epoch batch", "epoch pil")]
    assert all(positive(r["images_per_s"]) and positive(r["peak_mb"]) and r["system_s"] >= 0
               for r in record["allocator"])
    ratios = record["ratios"]["allocator_keep_over_default"]
    assert set(ratios) == {"conv4 step", "conv4 epoch batch", "conv4 epoch pil"} and all(map(positive, ratios.values()))


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO_ROOT / "bench" / "gpu.sh")], check=True)


def test_meta_bench_sizes_follow_the_device():
    """Unset sizes: the run scripts' on CUDA, minutes-sized on a CPU; sizes given on the command line stay."""
    from bench.meta import parse_args, resolve_sizes

    keys = ("episodes", "train_episodes", "val_episodes", "carry_episodes", "ref_episodes", "warmup")
    cpu = resolve_sizes(parse_args([]), torch.device("cpu"))
    assert [getattr(cpu, key) for key in keys] == [100, 40, 40, 30, 10, 2]
    cuda = resolve_sizes(parse_args([]), torch.device("cuda"))
    assert [getattr(cuda, key) for key in keys] == [600, 100, 100, 0, 60, 4]
    given = resolve_sizes(parse_args(["--episodes", "7", "--carry_episodes", "0"]), torch.device("cpu"))
    assert (given.episodes, given.carry_episodes, given.train_episodes) == (7, 0, 40)
