"""bench/gpu_run.py, every GPU check in one command, runs every step at its dry size on the CPU (synthetic cut)."""
from __future__ import annotations

import pytest
import json
import subprocess
import sys
import tarfile

from utils import REPO_ROOT


@pytest.mark.slow
def test_gpu_run_dry_runs_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_run.py"), "--dry", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert done.returncode == 0, (done.stdout[-2000:], (out / "gpu_run.log").read_text()[-4000:])
    names = [r["step"] for r in records]
    assert names[:8] == ["env", "tests", "bench_meta", "bench_pretrain", "unpack", "prepare", "pretrain", "extract"]
    assert {f"meta_{s}_{h}_{t}" for s in ("reset", "carry") for h in ("fusion", "concat") for t in ("in", "tran")} \
        <= set(names) and "proto" in names
    # the reset runs and the baseline before the slow carry runs
    assert names.index("proto") < min(names.index(n) for n in names if n.startswith("meta_carry"))
    assert all(r["status"] == "ok" for r in records)
    benches = [json.loads(line)["bench"] for line in (out / "bench.jsonl").read_text().splitlines()]
    assert benches == ["meta", "pretrain"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        assert any(name.startswith("runs/meta_carry_concat_tran") for name in tar.getnames())
    # the logs only: prepared data, checkpoints and run folders stay in --work
    assert sorted(path.name for path in out.iterdir()) == \
        ["bench.jsonl", "gpu_run.log", "report", "runs.tar.gz", "steps.jsonl"]


def test_gpu_run_budget_skips_what_no_longer_fits(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_run.py"), "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--only", "env", "recipe", "--budget", "10"],
                          capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert done.returncode == 1 and records and all(r["status"] == "skipped" for r in records)
    assert "budget" in records[0]["reason"]


def test_gpu_run_prepares_a_data_folder_in_place_and_unpacks_a_tar_first(tmp_path):
    from bench import gpu_run

    folder, tar = tmp_path / "cut", tmp_path / "cut.tar.gz"
    folder.mkdir()
    tar.write_bytes(b"")
    for data, unpack in ((folder, False), (tar, True)):
        args = gpu_run.parse_args(["--data", str(data)])
        plan = {step.name: step for step in gpu_run.steps(args, data, tmp_path / "work", tmp_path / "out")}
        assert ("unpack" in plan) == unpack and plan["prepare"].needs == (["unpack"] if unpack else [])
        raw = tmp_path / "work" / "raw" if unpack else folder
        assert str(raw / "mini-imagenet") in plan["prepare"].command
        assert {"report", "proto_finetune"} <= set(plan)


def test_gpu_run_without_data_refuses_the_recipe(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_run.py"), "--out", str(tmp_path / "out"),
                           "--only", "prepare"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--data must name the miniImageNet cut" in done.stderr
    assert not (tmp_path / "out").exists()
