"""bench/gpu_run.py, the GPU machine's one call, runs every step at its dry size on the CPU (synthetic cut)."""
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
    assert len(list(out.iterdir())) <= 8                        # what a GPU machine's $OUT can send back


def test_gpu_run_budget_skips_what_no_longer_fits(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_run.py"), "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--only", "env", "recipe", "--budget", "10"],
                          capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert done.returncode == 1 and records and all(r["status"] == "skipped" for r in records)
    assert "budget" in records[0]["reason"]
