"""The life of a training run, one set of rules for every trainer (pretraining, the meta stage, the ProtoNet
fine-tuning). The trainers keep their own loops; what they share is here:

- **Folder and lock.** ``--run_dir`` is created when missing (a file there is refused). The process that runs
  in it holds ``<run_dir>/.lock`` (an ``flock``, with its pid written inside): a second process on the same
  folder is refused at once, naming the folder and that pid. The kernel drops an ``flock`` when its process
  dies, however it dies, so a lock left by a killed process (``kill -9``) is taken over, with a note.
- **Files.** ``config.json`` (the run's flags as flag name -> value, with the git commit, the command and the
  start time), ``log.jsonl`` (one record per epoch), ``curves.png``, ``max_acc.pth`` (best validation),
  ``last.pth`` (written before the first epoch and after every epoch) and ``result.json``. Every file is
  written atomically: a write that fails ends the run with exit code 4 and one ``error:`` line naming the
  file, whose previous version stays intact (:mod:`utils.io`).
- **Resume.** ``--resume`` continues from ``last.pth``. A folder without one is refused. The checkpoint's
  flags must equal the run's, except those the trainer lists as free to change (``--max_epoch``, speed and
  test flags); the others are refused by name.
- **Stop.** Ctrl-C or SIGTERM ends the run at the next training step, without saving: the epoch in progress
  is dropped, and ``--resume`` redoes it from its start, identically (every epoch's episodes, batches and
  augmentations are a function of the seed and the epoch, and ``last.pth`` holds the generators' states).
  Validation, checkpoints and the final test are never cut short: a stop requested during them takes effect
  when they are done, and a stop after the last epoch lets the run finish. A second signal aborts at once.
  The exit code is 130 (SIGINT) or 143 (SIGTERM), and the command that continues the run is printed.
- **Learning rate.** :func:`step_lr`, the release's StepLR stepped at the start of every epoch.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NoReturn

import torch
from torch import nn

from trainer.checkpoint import load_weights, save_checkpoint
from utils.interrupt import StopRequest
from utils.io import InputError, JsonlLog, SaveError, atomic_write, ensure_folder, save_json
from utils.runtime import git_commit, resolve_path

# Flags that never shape the training, so a resumed run may give other values (--deterministic only picks
# CUDA kernels).
ALWAYS_FREE = ("resume", "run_dir", "device", "threads", "data_root", "deterministic")


def step_lr(lr: float, gamma: float, step_size: int, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: ``lr * gamma ** floor(epoch / step_size)``.

    The release calls ``StepLR.step()`` at the *start* of every epoch (PyTorch >= 1.1 semantics), so epoch 1
    already counts as one step: with step_size 30, epochs 1-29 train at lr, 30-59 at lr * gamma, ...
    """
    return lr * gamma ** (epoch // step_size)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def default_run_dir(*parts: str) -> Path:
    """``runs/<parts joined by _>-<timestamp>`` under the repository."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return resolve_path("runs") / f"{'_'.join(str(p) for p in parts)}-{stamp}"


def chosen_run_dir(run_dir: str | os.PathLike | None, resume: bool, *parts: str) -> Path:
    """``--run_dir``, or a new ``runs/<parts>-<time>`` when it is not given; ``--resume`` needs it named."""
    if run_dir is not None:
        return resolve_path(run_dir)
    if resume:
        raise InputError("--resume needs --run_dir: the folder of the run to continue.")
    return default_run_dir(*parts)


def run_folder(path: str | os.PathLike) -> Path:
    """The folder ``path``, created when missing; a file there is bad input, not a full disk."""
    path = resolve_path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--run_dir {path} is a file, not a folder; pass a folder (it is created when missing).")
    return ensure_folder(path)


@contextlib.contextmanager
def locked(path: str | os.PathLike, resume: bool = False) -> Iterator[Path]:
    """Hold the lock of the run folder ``path`` (created when missing) while the block runs; yields the folder.

    A folder this call created is removed again when the block fails before anything but the lock was written
    (bad input found after locking leaves no empty run folder behind).

    Raises:
        InputError: another live process holds it (named with its pid), or ``resume`` and it does not exist.
    """
    created = not resolve_path(path).exists()
    if resume and created:
        raise InputError(f"--resume: run folder {resolve_path(path)} not found; pass the --run_dir of the run to "
                         f"continue.")
    folder = run_folder(path)
    lock = folder / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SaveError.from_os_error(lock, err) from err
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InputError(f"--run_dir {folder} is in use by process {holder} (it holds {lock}); wait for it to "
                             f"end or stop it, or pass another --run_dir.") from None
        held = True
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous:
            print(f"note: {folder}: taking over the lock of process {previous}, which ended without releasing it "
                  f"(killed?)", flush=True)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise SaveError.from_os_error(lock, err) from err
        yield folder
    except BaseException:
        if held and created and [p.name for p in folder.iterdir()] == [lock.name]:
            with contextlib.suppress(OSError):
                lock.unlink()
                folder.rmdir()
        raise
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an empty lock file: released cleanly
        os.close(fd)


def _plain(value):
    """``value`` as JSON reads it back (tuples become lists, paths strings), so saved and current flags compare."""
    return json.loads(json.dumps(value, default=str))


class Run:
    """The files of one run folder, and the rules for resuming and stopping it.

    Args:
        path: the run folder (a trainer with several shots has one per shot, under the locked ``--run_dir``).
        config: the run's flags, flag name -> value; written to ``config.json`` and into every checkpoint.
        resume: continue from ``last.pth`` (which must exist).
        free: flags that may differ on ``--resume`` (besides :data:`ALWAYS_FREE`).
        resume_dir: the ``--run_dir`` to name in the resume command (default ``path``).
        write: False in all but one process of a multi-process run: nothing is written.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping, resume: bool = False, free: Iterable[str] = (),
                 resume_dir: str | os.PathLike | None = None, write: bool = True):
        self.path = resolve_path(path)
        self.config, self.resume, self.free, self.write = _plain(dict(config)), resume, set(free), write
        self.resume_dir = Path(resume_dir or self.path)
        self.best, self.last = self.path / "max_acc.pth", self.path / "last.pth"
        if resume and not self.last.is_file():
            raise InputError(f"--resume: {self.last} not found, so {self.path} holds no run to continue. Check "
                             f"--run_dir (it names the folder of the interrupted run), or start the run again "
                             f"without --resume.")
        self.log = JsonlLog(self.path / "log.jsonl", keep_existing=resume)
        self._tensorboard = None
        if write:
            run_folder(self.path)
            save_json(self.path / "config.json", {**self.config, "git_commit": git_commit(),
                                                   "command": " ".join(sys.argv),
                                                   "started": _dt.datetime.now().isoformat(timespec="seconds")})
            with contextlib.suppress(ImportError):  # tensorboard is optional
                from torch.utils.tensorboard import SummaryWriter
                self._tensorboard = SummaryWriter(str(self.path))

    def restore(self, module: nn.Module, kind: str, device: torch.device) -> dict:
        """Load ``last.pth`` into ``module`` (keys checked) and check the flags; returns the checkpoint, whose
        ``epoch`` is the last complete one (0: stopped in the first), for the trainer to restore the rest."""
        ckpt = load_weights(module, self.last, map_location=device, kind=kind)
        if "optimizer" not in ckpt:
            raise InputError(f"--resume: {self.last} holds no training state (a plain {kind} checkpoint?); pass the "
                             f"--run_dir of an interrupted run, or start a new one.")
        saved = ckpt.get("config", {})
        changed = [f"--{key} {saved.get(key)} -> {value}" for key, value in self.config.items()
                   if key not in self.free and key not in ALWAYS_FREE and saved.get(key) != value]
        if changed:
            raise InputError(f"--resume: {self.last} was trained with other values of {', '.join(changed)}; resume "
                             f"with the flags the run started with, or start a new --run_dir.")
        self.log.truncate_after("epoch", int(ckpt["epoch"]))
        if self.write:
            print(f"resuming {self.path} after epoch {int(ckpt['epoch'])}", flush=True)
        return ckpt

    def save(self, path: Path, params: Mapping[str, torch.Tensor], **metadata) -> None:
        """A checkpoint in this folder, carrying the run's flags as ``config``."""
        if self.write:
            save_checkpoint(path, params, **metadata, config=self.config)

    def record(self, record: dict) -> None:
        """Append one epoch's record to the log, TensorBoard and the learning-curve plot."""
        if not self.write:
            return
        self.log.append(record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record.get("epoch", 0))
            self._tensorboard.flush()
        plot_curves(self.log.records(), self.path / "curves.png")

    def save_result(self, result: dict) -> Path:
        path = self.path / "result.json"
        save_json(path, {**result, "git_commit": git_commit()})
        return path

    def epochs(self, first: int, last: int, stop: StopRequest) -> Iterator[int]:
        """The epochs ``first..last``; after each but the last, a stop request ends the run for ``--resume``."""
        for epoch in range(first, last + 1):
            yield epoch
            if epoch < last and stop.requested:
                stop.exit_for_resume(self.resume_dir, f"stopped after epoch {epoch}")

    def drop_epoch(self, epoch: int, stop: StopRequest) -> NoReturn:
        """End the run in the middle of ``epoch``: ``--resume`` redoes it from its start."""
        stop.exit_for_resume(self.resume_dir, f"stopped in epoch {epoch}, which --resume redoes from its start")


def plot_curves(records: list[dict], path: Path, step_key: str = "epoch") -> None:
    """Draw losses (left) and accuracies (right) against ``step_key`` into a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    if not records:
        return
    steps = [r.get(step_key) for r in records]
    keys = [k for k in records[-1] if k != step_key and isinstance(records[-1][k], (int, float))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, title in zip(axes, ("loss", "acc")):
        for key in (k for k in keys if title in k):
            ax.plot(steps, [r.get(key, float("nan")) for r in records], marker="o", label=key)
        ax.set_xlabel(step_key)
        ax.set_title("accuracy" if title == "acc" else title)
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
