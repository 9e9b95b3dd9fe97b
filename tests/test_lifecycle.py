"""The run lifecycle (trainer/runs.py), tried with the real thing on all three trainers (pretraining, the meta
stage, the ProtoNet fine-tuning):

- Ctrl-C (SIGINT) and SIGTERM sent to a child process in the middle of an epoch: exit 130 / 143 with the resume
  command, the epoch dropped; two resumes later the run ends bit for bit where an uninterrupted one ends.
- A second process on the same run folder is refused, naming the folder and the pid of the first.
- ``kill -9`` leaves a stale lock, which the resumed run takes over with a note, and no lost work.
- A real full disk (a small tmpfs mounted by the test, as root) ends the run with exit 4 and one ``error:`` line
  naming the file; the previous files stay intact and no temporary file is left.
- ``--resume`` on a folder without ``last.pth`` is refused the same way by every trainer.
- Files written while the writer is killed are always a complete old or new version.

A stopped run is a child process that pauses at a chosen training step (a wrapper around ``cross_entropy`` writes
a marker file and waits for a ``.go`` file beside it); the test then sends its signal. Everything runs on one CPU
thread so that the in-process runs and the child compute bit for bit the same.
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
import run_proto
from models import build_backbone
from synthetic_data import write_synthetic
from trainer import meta
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.runs import Run
from utils import REPO_ROOT, JsonlLog, SaveError, save_json, save_npz
from utils.cli import EXIT_CANNOT_SAVE

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
    marker = tmp_path / f"paused-{step}-{time.monotonic_ns()}"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(step), str(REPO_ROOT / script), *argv],
                             cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached step {step}:\n{child.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return child, marker


def stop_at_step(script: str, argv: list[str], step: int, tmp_path: Path, signum: int) -> tuple[int, str, int]:
    """Run ``script argv`` in a child process and send it ``signum`` while it is in training step ``step``;
    returns its exit code, its output and its pid."""
    child, marker = paused_at_step(script, argv, step, tmp_path)
    os.kill(child.pid, signum)
    Path(f"{marker}.go").touch()
    output, _ = child.communicate(timeout=300)
    return child.returncode, output, child.pid


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


# ------------------------------------------------------------------------------------------ the trainers
class Trainer:
    """One trainer as a command: its script, tiny flags (3 epochs of ``steps`` training steps), and how to run it
    in this process (returns the exit code)."""

    def __init__(self, name: str, script: str, flags: list[str], steps: int, pth_kb: int):
        self.name, self.script, self.flags, self.steps, self.pth_kb = name, script, flags, steps, pth_kb

    def argv(self, run_dir: Path, *extra: str) -> list[str]:
        return [*self.flags, "--run_dir", str(run_dir), *extra]

    def __call__(self, run_dir: Path, *extra: str) -> int:
        argv = self.argv(run_dir, *extra)
        if self.script == "run_fusion.py":
            return meta.cli(runpy.run_path(str(REPO_ROOT / self.script))["parser"], argv)
        main = run_pre.main if self.script == "run_pre.py" else run_proto.main
        try:
            main(argv)
        except SystemExit as exit_:
            return exit_.code
        return 0


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, tiny_image_root) -> dict[str, Trainer]:
    """Pretraining of a Conv-4, the fusion meta stage in carry mode (the regressor carries over, so last.pth must
    hold it too; D = 50, so that a checkpoint is ~0.5 MB), and the ProtoNet fine-tuning of a Conv-4."""
    features = write_synthetic(tmp_path_factory.mktemp("lifecycle-meta"), dim=50, classes=(8, 6, 5), per_class=12)
    torch.manual_seed(0)
    backbone = tmp_path_factory.mktemp("weights") / "conv4.pth"
    save_checkpoint(backbone, build_backbone("conv4").state_dict(), kind="backbone", model_type="conv4")
    return {
        "pre": Trainer("pre", "run_pre.py", [
            "--data_root", str(tiny_image_root), "--device", "cpu", "--model_type", "conv4", "--pre_batch_size", "2",
            "--max_train_batches", "2", "--way", "2", "--shot", "1", "--val_query", "1", "--val_episodes", "3",
            "--pre_lr", "0.01", "--pre_max_epoch", "3", "--num_workers", "0"], steps=2, pth_kb=400),
        "meta": Trainer("meta", "run_fusion.py", [
            "--data_root", str(features), "--device", "cpu", "--shot", "1", "--inner_state", "carry", "--max_epoch",
            "3", "--num_batch", "3", "--val_episodes", "4", "--test_episodes", "20", "--inner_steps", "3",
            "--episode_batch", "4", "--train_query", "5", "--val_query", "5", "--test_query", "5"], steps=3,
            pth_kb=400),
        "finetune": Trainer("finetune", "run_proto.py", [
            "--data_root", str(tiny_image_root), "--init_weights", str(backbone), "--finetune", "--model_type",
            "conv4", "--device", "cpu", "--way", "3", "--shot", "1", "--train_query", "2", "--val_query", "2",
            "--query", "2", "--episodes", "4", "--val_episodes", "3", "--num_batch", "2", "--max_epoch", "3",
            "--vlr", "0.01"], steps=2, pth_kb=400),
    }


@pytest.fixture(scope="module")
def straight(trainers, tmp_path_factory) -> dict[str, Path]:
    """Each trainer's uninterrupted run folder."""
    folders = {}
    with torch_threads(1):  # a module fixture is set up outside the autouse one_thread
        for name, trainer in trainers.items():
            folders[name] = tmp_path_factory.mktemp(f"straight-{name}")
            assert trainer(folders[name]) == 0
    return folders


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Weights, optimizer moments and log (timings aside) bit for bit the same, and the same test result."""
    for name in ("max_acc.pth", "last.pth"):
        assert_same_params(straight / name, resumed / name)
    a, b = load_checkpoint(straight / "last.pth"), load_checkpoint(resumed / "last.pth")
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert log_records(straight) == log_records(resumed)
    if (straight / "result.json").exists():
        result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
        assert (result_a["test_acc"], result_a["test_ci95"]) == (result_b["test_acc"], result_b["test_ci95"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pre", "meta", "finetune"])
def test_sigint_and_sigterm_drop_the_epoch_and_resume_to_the_straight_run(trainers, straight, name, tmp_path,
                                                                          capsys):
    """Ctrl-C in epoch 2 of a child process (while it holds the folder, a second process is refused); then a
    resumed child gets SIGTERM in epoch 3; a last resume ends where the straight run ends."""
    trainer, run_dir = trainers[name], tmp_path / "run"
    child, marker = paused_at_step(trainer.script, trainer.argv(run_dir), trainer.steps + 1, tmp_path)
    assert trainer(run_dir) == 2                                                   # the second process
    assert f"error: --run_dir {run_dir} is in use by process {child.pid}" in capsys.readouterr().err
    os.kill(child.pid, signal.SIGINT)
    Path(f"{marker}.go").touch()
    output, _ = child.communicate(timeout=300)
    assert child.returncode == 130, output[-3000:]
    assert "SIGINT: stopping after this" in output and "Traceback" not in output
    assert "stopped in epoch 2, which --resume redoes from its start; continue with:" in output
    assert output.rstrip().endswith(f"--resume --run_dir {run_dir}")
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1 and [r["epoch"] for r in log_records(run_dir)] == [1]
    assert no_temp_files(run_dir) and not (run_dir / "result.json").exists()

    # the resumed child redoes epoch 2 (steps 1..steps) and is stopped in epoch 3
    code, output, _ = stop_at_step(trainer.script, trainer.argv(run_dir, "--resume"), trainer.steps + 1, tmp_path,
                                   signal.SIGTERM)
    assert code == 143 and "stopped in epoch 3, which --resume redoes" in output, output[-3000:]
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 2

    assert trainer(run_dir, "--resume") == 0
    assert_same_run(straight[name], run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pre", "meta"])
def test_kill_9_leaves_a_stale_lock_that_the_resume_takes_over_with_no_lost_work(trainers, straight, name,
                                                                                  tmp_path, capsys):
    trainer, run_dir = trainers[name], tmp_path / "killed"
    code, _, pid = stop_at_step(trainer.script, trainer.argv(run_dir), trainer.steps + 2, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert (run_dir / ".lock").read_text().strip() == str(pid)
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1 and no_temp_files(run_dir)
    assert trainer(run_dir, "--resume") == 0
    assert f"taking over the lock of process {pid}, which ended without releasing it" in capsys.readouterr().out
    assert (run_dir / ".lock").read_text() == ""                                   # released cleanly
    assert_same_run(straight[name], run_dir)


@pytest.mark.parametrize("name", ["pre", "meta", "finetune"])
def test_resume_without_last_pth_is_refused_the_same_way(trainers, name, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert trainers[name](tmp_path / "run", "--resume") == 2
    err = capsys.readouterr().err
    assert f"error: --resume: {tmp_path / 'run' / 'last.pth'} not found, so {tmp_path / 'run'} holds no run to " \
           f"continue. Check --run_dir" in err and "Traceback" not in err


def test_a_run_dir_that_is_a_file_is_named_as_such(trainers, tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    assert trainers["meta"](tmp_path / "run") == 2
    assert f"error: --run_dir {tmp_path / 'run'} is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 4 MB tmpfs mounted for the test: a real disk that fills up (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_kb: int) -> None:
    """Fill ``disk`` until ``leave_kb`` KiB are free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave_kb * 1024))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


WRITERS = {
    "checkpoint": ("w.pth", lambda path, v: save_checkpoint(path, {"w": torch.full((300_000,), float(v))}, epoch=v)),
    "json": ("result.json", lambda path, v: save_json(path, {"version": v, "pad": "x" * 300_000})),
    "npz": ("feat.npz", lambda path, v: save_npz(path, features=np.full((300, 300), v, np.float32))),
    "jsonl": ("log.jsonl", lambda path, v: JsonlLog(path).append({"epoch": v, "pad": "x" * 300_000})),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_on_a_full_disk_keeps_the_previous_file(writer, small_disk):
    name, write = WRITERS[writer]
    path = small_disk / name
    write(path, 1)
    fill(small_disk, leave_kb=100)
    before = snapshot(small_disk)
    with pytest.raises(SaveError) as failure:
        write(path, 2)
    assert str(failure.value).startswith(f"cannot write {path}: No space left on device; its previous version")
    assert snapshot(small_disk) == before                                          # no temporary file either


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pre", "meta", "finetune"])
def test_a_full_disk_ends_the_run_with_one_error_line_and_the_previous_files_intact(trainers, name, small_disk,
                                                                                     capsys):
    """Epoch 1 is saved; then the disk has room for the log but not for a checkpoint: exit 4, one error line
    naming the checkpoint, every file as it was, no temporary file."""
    trainer, run_dir = trainers[name], small_disk / "run"
    assert trainer(run_dir, "--max_epoch" if name != "pre" else "--pre_max_epoch", "1") == 0
    fill(small_disk, leave_kb=trainer.pth_kb // 2)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert trainer(run_dir, "--resume") == EXIT_CANNOT_SAVE == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: cannot write {run_dir}{os.sep}") and ".pth: No space left on device;" in line
    assert line.endswith("Free space on that disk (or write elsewhere) and run again.")
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.endswith((".json", ".jsonl", ".png", ".lock"))} == \
           {k: v for k, v in before.items() if not k.endswith((".json", ".jsonl", ".png", ".lock"))}
    assert load_checkpoint(run_dir / "last.pth")["epoch"] == 1 and no_temp_files(run_dir)


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


def test_ctrl_c_during_the_last_validation_lets_the_run_finish_with_its_test(trainers, tmp_path, monkeypatch,
                                                                             capsys):
    """A real SIGINT to this process while the meta stage validates its last epoch: the training is complete, so
    the run ends with its test (exit 0, result.json) instead of exiting for a resume that would only test."""
    trainer, run_dir = trainers["meta"], tmp_path / "run"
    evaluate, calls = meta.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # validation after epoch 3 of 3
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(meta, "evaluate", interrupted)
    assert trainer(run_dir) == 0
    out, err = capsys.readouterr()
    assert "SIGINT: stopping after this training step" in err and "Test Acc" in out and "continue with" not in err
    assert json.loads((run_dir / "result.json").read_text())["test_episodes"] == 20
