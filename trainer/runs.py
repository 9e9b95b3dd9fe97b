"""The run folder every experiment writes: config, JSON-lines log, learning curve, result.

``<run_dir>/config.json``   the full configuration, the git commit, the date and the device
``<run_dir>/log.jsonl``     one JSON record per epoch
``<run_dir>/curves.png``    the learning curve drawn from the log
``<run_dir>/result.json``   the final figures (written by the caller through :meth:`RunFolder.save_result`)
TensorBoard event files are added to the same folder when the ``tensorboard`` package is installed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
from pathlib import Path

from utils.io import JsonlLog, ensure_folder, save_json
from utils.runtime import git_commit, resolve_path

log = logging.getLogger(__name__)


def default_run_dir(*parts: str) -> Path:
    """``runs/<parts joined by _>-<timestamp>`` under the repository."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return resolve_path("runs") / f"{'_'.join(str(p) for p in parts)}-{stamp}"


class RunFolder:
    """Creates the folder, writes ``config.json`` and keeps the log and the learning curve up to date.

    Args:
        run_dir: the folder (created if needed).
        config: the run's configuration (an argparse namespace or a dict); ``None`` writes no config
            (e.g. a sub-folder that shares its parent's).
        resume: keep an existing log (a resumed run appends to it).
    """

    def __init__(self, run_dir: str | Path, config: argparse.Namespace | dict | None = None, resume: bool = False):
        self.path = ensure_folder(resolve_path(run_dir))
        if config is not None:
            config = dict(vars(config)) if isinstance(config, argparse.Namespace) else dict(config)
            save_json(self.path / "config.json", {
                **config, "git_commit": git_commit(), "command": " ".join(sys.argv),
                "started": _dt.datetime.now().isoformat(timespec="seconds")})
        self.log = JsonlLog(self.path / "log.jsonl", keep_existing=resume)
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.path))
        except ImportError:  # tensorboard is optional
            pass

    def record(self, record: dict, step_key: str = "epoch") -> None:
        """Append one record to the log, TensorBoard and the learning-curve plot."""
        self.log.append(record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != step_key and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record.get(step_key, 0))
            self._tensorboard.flush()
        plot_curves(self.log.records(), self.path / "curves.png", step_key)

    def save_result(self, result: dict, name: str = "result.json") -> Path:
        path = self.path / name
        save_json(path, {**result, "git_commit": git_commit()})
        return path


def plot_curves(records: list[dict], path: Path, step_key: str = "epoch") -> None:
    """Draw losses (left) and accuracies (right) against ``step_key`` into a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    from utils.io import atomic_write

    if not records:
        return
    steps = [r.get(step_key) for r in records]
    keys = [k for k in records[-1] if k != step_key and isinstance(records[-1][k], (int, float))]
    loss_keys = [k for k in keys if "loss" in k]
    acc_keys = [k for k in keys if "acc" in k]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, title in ((axes[0], loss_keys, "loss"), (axes[1], acc_keys, "accuracy")):
        for key in group:
            ax.plot(steps, [r.get(key, float("nan")) for r in records], marker="o", label=key)
        ax.set_xlabel(step_key)
        ax.set_title(title)
        if group:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
