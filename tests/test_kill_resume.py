"""No lost work: ``kill -9`` in the middle of an epoch, then ``--resume``, ends exactly where an uninterrupted run
with the same seed ends (pretraining and meta-training, CPU); SIGTERM (how Slurm and Kubernetes stop a job) in
the middle of a pretraining epoch finishes the batch, saves and exits 143 with the resume command; Ctrl-C in the
meta stage; files written while the writer is killed are always a complete old or new version.

The stopped run is a child process that pauses at a chosen training step (a wrapper around ``cross_entropy``
writes a marker file and waits for a ``.go`` file beside it); the test then sends its signal. Everything runs on
one CPU thread so that the in-process runs and the child compute bit for bit the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run_pre
from synthetic_data import signal_on_call, write_synthetic
from trainer import meta, pre
from trainer.checkpoint import load_checkpoint
from utils import REPO_ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

# The child: pause at the N-th cross_entropy call (a training step) until <marker>.go exists (or it is killed),
# else run the entry point. Short sleeps: a signal handler runs between them.
CHILD = textwrap.dedent("""
    import os, runpy, sys, time
    import torch.nn.functional as F
    marker, pause_at, script, *argv = sys.argv[1:]
    calls, cross_entropy = [], F.cross_entropy
    def pausing(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(pause_at):
            open(marker, "w").close()
            deadline = time.monotonic() + 600
            while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
                time.sleep(0.05)
        return cross_entropy(*args, **kwargs)
    F.cross_entropy = pausing
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
""")


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def paused_at_step(script: str, argv: list[str], step: int, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``script argv`` in a child process; return it, paused in training step ``step``, and its marker."""
    marker = tmp_path / f"paused-{step}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(step), str(REPO_ROOT / script), *argv],
                             cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached step {step}:\n{child.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return child, marker


def kill_at_step(script: str, argv: list[str], step: int, tmp_path: Path) -> None:
    """Run ``script argv`` in a child process and SIGKILL it while it is in training step ``step``."""
    child, _ = paused_at_step(script, argv, step, tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def log_records(run_dir: Path) -> list[dict]:
    """The JSON-lines log without the timing fields."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in records]


def assert_same_params(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a)["params"], load_checkpoint(path_b)["params"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def no_temp_files(run_dir: Path) -> bool:
    return not list(run_dir.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ pretraining
PRE = ["--device", "cpu", "--pre_batch_size", "2", "--max_train_batches", "2", "--way", "2", "--shot", "1",
       "--val_query", "1", "--val_episodes", "3", "--pre_lr", "0.01", "--pre_max_epoch", "2", "--num_workers", "0"]


@pytest.mark.slow
def test_pretraining_killed_mid_epoch_resumes_to_the_same_weights(tiny_image_root, tmp_path):
    """2 epochs of 2 batches; the child is killed in batch 2 of epoch 2 (after one unsaved optimizer step)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    flags = ["--data_root", str(tiny_image_root), *PRE]
    assert pre.main(run_pre.parse_args([*flags, "--run_dir", str(straight)]))["epochs"] == 2

    kill_at_step("run_pre.py", [*flags, "--run_dir", str(killed)], step=4, tmp_path=tmp_path)
    ckpt = load_checkpoint(killed / "last.pth")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0)                       # epoch 1 complete, epoch 2 lost
    assert [r["epoch"] for r in log_records(killed)] == [1] and no_temp_files(killed)

    assert pre.main(run_pre.parse_args([*flags, "--run_dir", str(killed), "--resume"]))["epochs"] == 2
    assert_same_pretraining(straight, killed)


def assert_same_pretraining(straight: Path, resumed: Path) -> None:
    """Backbones, classifier and log (timings aside) bit for bit the same."""
    for name in ("last.pth", "max_acc.pth"):
        assert_same_params(straight / name, resumed / name)
    a, b = load_checkpoint(straight / "last.pth"), load_checkpoint(resumed / "last.pth")
    for key in a["classifier"]:
        assert torch.equal(a["classifier"][key], b["classifier"][key])
    assert log_records(straight) == log_records(resumed)


@pytest.mark.slow
def test_pretraining_sigterm_mid_epoch_saves_the_batch_and_resumes_to_the_same_weights(tiny_image_root, tmp_path):
    """Conv-4, 2 epochs of 2 batches; SIGTERM arrives in batch 1 of epoch 2: that batch is finished, last.pth
    written at its end, exit code 143 after the resume command; resuming then matches the uninterrupted run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ["--data_root", str(tiny_image_root), *PRE, "--model_type", "conv4"]
    assert pre.main(run_pre.parse_args([*flags, "--run_dir", str(straight)]))["epochs"] == 2

    child, marker = paused_at_step("run_pre.py", [*flags, "--run_dir", str(stopped)], step=3, tmp_path=tmp_path)
    os.kill(child.pid, signal.SIGTERM)
    Path(f"{marker}.go").touch()
    output, _ = child.communicate(timeout=300)
    assert child.returncode == 143, output[-3000:]
    assert "SIGTERM: stopping after this batch" in output and "Traceback" not in output
    assert "stopped in epoch 2 after batch 1; continue with:" in output
    assert output.rstrip().endswith(f"--resume --run_dir {stopped}")
    ckpt = load_checkpoint(stopped / "last.pth")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 1)                      # epoch 1 and one batch of epoch 2
    assert [r["epoch"] for r in log_records(stopped)] == [1] and no_temp_files(stopped)

    assert pre.main(run_pre.parse_args([*flags, "--run_dir", str(stopped), "--resume"]))["epochs"] == 2
    assert_same_pretraining(straight, stopped)


# ------------------------------------------------------------------------------------------ meta stage
# carry mode: the regressor carries over from episode to episode, so last.pth must hold it as well
META = ["--device", "cpu", "--shot", "1", "--inner_state", "carry", "--max_epoch", "3", "--num_batch", "4",
        "--val_episodes", "4", "--test_episodes", "20", "--inner_steps", "3", "--episode_batch", "4",
        "--train_query", "5", "--val_query", "5", "--test_query", "5"]


@pytest.fixture(scope="module")
def meta_root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("kill-meta"), dim=6, classes=(8, 6, 5), per_class=12)


@pytest.fixture(scope="module")
def meta_straight(meta_root, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run: its folder and its result."""
    run_dir = tmp_path_factory.mktemp("straight")
    with torch_threads(1):  # a module fixture is set up outside the autouse one_thread
        assert fusion(meta_root, run_dir) == 0
    return run_dir, json.loads((run_dir / "result.json").read_text())


def fusion(root: Path, run_dir: Path, *flags: str) -> int:
    parser = runpy.run_path(str(REPO_ROOT / "run_fusion.py"))["parser"]
    return meta.cli(parser, ["--data_root", str(root), "--run_dir", str(run_dir), *META, *flags])


def assert_same_meta_run(straight: Path, resumed: Path, result: dict) -> None:
    for name in ("max_acc.pth", "last.pth"):
        assert_same_params(straight / name, resumed / name)
    again = json.loads((resumed / "result.json").read_text())
    assert (again["test_acc"], again["test_ci95"], again["val_best_epoch"]) == (
        result["test_acc"], result["test_ci95"], result["val_best_epoch"])
    assert log_records(straight) == log_records(resumed)


@pytest.mark.slow
def test_meta_training_killed_mid_epoch_resumes_to_the_same_test_accuracy(meta_root, meta_straight, tmp_path,
                                                                           capsys):
    """3 epochs of 4 episodes; the child is killed in episode 2 of epoch 2."""
    straight, result = meta_straight
    killed = tmp_path / "killed"
    kill_at_step("run_fusion.py", ["--data_root", str(meta_root), "--run_dir", str(killed), *META], step=6,
                 tmp_path=tmp_path)
    assert load_checkpoint(killed / "last.pth")["epoch"] == 1 and [r["epoch"] for r in log_records(killed)] == [1]
    assert no_temp_files(killed) and not (killed / "result.json").exists()

    # resuming with a flag that changes the run is refused, naming it
    assert fusion(meta_root, killed, "--resume", "--gradlr", "0.02") == 2
    assert "--gradlr 0.01 -> 0.02" in capsys.readouterr().err

    assert fusion(meta_root, killed, "--resume") == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_meta_run(straight, killed, result)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_meta_ctrl_c_or_sigterm_exits_cleanly_and_resumes(meta_root, meta_straight, tmp_path, monkeypatch, capsys,
                                                          signum, code):
    """Ctrl-C or SIGTERM in epoch 2: the episode finishes, exit code 130 / 143, the resume command, no traceback;
    the resumed run equals the straight one."""
    straight, result = meta_straight
    run_dir = tmp_path / "interrupted"
    cross_entropy = meta.F.cross_entropy
    interrupt_in_epoch_2, _ = signal_on_call(cross_entropy, call=6, signum=signum)   # the episode finishes
    monkeypatch.setattr(meta.F, "cross_entropy", interrupt_in_epoch_2)
    assert fusion(meta_root, run_dir) == code
    err = capsys.readouterr().err
    assert "stopped in epoch 2 (epoch 1 is the last complete one); continue with:" in err
    assert f"--resume --run_dir {run_dir}" in err and "Traceback" not in err
    monkeypatch.setattr(meta.F, "cross_entropy", cross_entropy)
    assert fusion(meta_root, run_dir, "--resume") == 0
    assert_same_meta_run(straight, run_dir, result)


# ------------------------------------------------------------------------------------------ atomic files
WRITER = textwrap.dedent("""
    import sys, torch, numpy as np
    from trainer.checkpoint import save_checkpoint
    from utils import JsonlLog, save_npz, save_json
    folder = sys.argv[1]
    big = torch.arange(500_000, dtype=torch.float32)
    log = JsonlLog(folder + "/log.jsonl")
    version = 0
    while True:
        version += 1
        save_checkpoint(folder + "/ckpt.pth", {"w": big + version}, epoch=version)
        save_npz(folder + "/feat.npz", features=np.full((1000, 640), version, np.float32))
        save_json(folder + "/result.json", {"version": version, "pad": "x" * 100_000})
        log.append({"epoch": version})
        if version == 3:
            open(folder + "/started", "w").close()
""")


@pytest.mark.parametrize("delay", [0.0, 0.37])
@pytest.mark.slow
def test_files_killed_while_being_written_are_complete(tmp_path, delay):
    """SIGKILL a process that rewrites a checkpoint, an npz, a JSON file and a log in a loop: each file is
    afterwards one complete version (a hidden ``.<name>.*.tmp`` may be left beside it)."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO_ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "started").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(child.communicate()[1][-3000:])
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stderr.close()

    ckpt = load_checkpoint(tmp_path / "ckpt.pth")
    assert torch.equal(ckpt["params"]["w"], torch.arange(500_000, dtype=torch.float32) + ckpt["epoch"])
    with np.load(tmp_path / "feat.npz") as npz:
        features = npz["features"]
    assert features.shape == (1000, 640) and (features == features[0, 0]).all()
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["pad"]) == 100_000
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))
    # written in this order, version after version: the kill leaves version v before some point, v - 1 after it
    versions = [ckpt["epoch"], int(features[0, 0]), result["version"], epochs[-1]]
    assert versions == sorted(versions, reverse=True) and versions[0] - versions[-1] in (0, 1), versions
