"""Stopping a run cleanly when asked to: Ctrl-C (SIGINT) or SIGTERM, the signal with which Slurm, Kubernetes
and ``kill`` end a job (they follow it with SIGKILL after a grace period, 30 s by default).

The first signal only records a stop request; the trainer checks it at its next training step and calls
:meth:`StopRequest.exit_for_resume`, which prints the command that continues the run and exits with the code a
shell gives a process ended by that signal (130 for SIGINT, 143 for SIGTERM), so that job scripts can tell a
stop from a failure. A second signal aborts at once (``SystemExit`` with the same code, which still runs
``finally`` blocks, so a half-written file is removed and the previous version kept). What a stop keeps and
what ``--resume`` redoes is one rule for every trainer: :mod:`trainer.runs`.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit code of a process ended by signal ``signum``: 128 + signum (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class StopRequest:
    """Turns SIGINT and SIGTERM into a stop request while the ``with`` block runs (main thread only).

    Args:
        boundary: what the loop finishes before stopping, for the message printed on the first signal.
        announce: print the messages (False in all but one process of a multi-process run).
        agree: in a multi-process run, maps this process's signal number (0: none) to the highest over all
            processes, so that every process stops at the same step; :attr:`requested` then calls it, so every
            process must read it equally often.

    Attributes:
        signal: the first signal received (``signal.SIGINT`` or ``signal.SIGTERM``), None while none came.
    """

    def __init__(self, boundary: str = "this step", announce: bool = True, agree=None):
        self.boundary, self.announce, self.agree = boundary, announce, agree
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        if self.agree is not None:
            signum = self.agree(int(self.signal or 0))
            if signum:
                self.request(signum)
        return self.signal is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Record a stop request without a signal, e.g. one that another process of a DDP run received."""
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def __enter__(self) -> StopRequest:
        # Python delivers signals to the main thread only; elsewhere the default handlers stay
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            self._say(f"\n{name} again: aborting now, without saving")
            raise SystemExit(exit_code(signum))
        self.request(signum)
        again = "Ctrl-C" if signum == signal.SIGINT else name
        self._say(f"\n{name}: stopping after {self.boundary} ({again} again aborts at once)")

    def _say(self, message: str) -> None:
        if self.announce:
            print(message, file=sys.stderr, flush=True)

    def exit_for_resume(self, run_dir: str | os.PathLike, what: str) -> NoReturn:
        """Print ``<what>; continue with: <command>`` on stderr and exit with the code of the signal received.

        Args:
            run_dir: the run folder; the printed command continues the run in it (:func:`resume_command`).
            what: where the run stopped, e.g. ``stopped in epoch 3 after batch 12``.
        """
        self._say(f"{what}; continue with:\n  {resume_command(run_dir)}")
        raise SystemExit(exit_code(self.signal if self.signal is not None else signal.SIGINT))


def resume_command(run_dir: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same flags, then ``--resume --run_dir <run_dir>``.

    Args:
        argv: the command line of this run (default ``sys.argv``); its ``--resume`` and ``--run_dir`` are dropped.
    """
    script, *flags = list(sys.argv if argv is None else argv) or ["<script>"]
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--run_dir":
            skip = True
        elif flag != "--resume" and not flag.startswith("--run_dir="):
            kept.append(flag)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launcher = ["torchrun", "--nproc_per_node", str(processes)] if processes > 1 else ["python"]
    return shlex.join([*launcher, _shorter(script), *kept, "--resume", "--run_dir", str(run_dir)])


def _shorter(script: str) -> str:
    """``script`` relative to the working directory when it lies below it (the usual ``python run_pre.py``)."""
    path = Path(script)
    try:
        return str(path.resolve().relative_to(Path.cwd())) if path.is_absolute() else script
    except ValueError:
        return script
