"""File I/O that never leaves a half-written file behind.

Every file the project writes goes through :func:`atomic_write`: the content goes to a temporary file in
the same folder, is flushed to disk, then ``os.replace`` swaps it in. A crash or ``kill -9`` at any moment
leaves either the previous complete file or the new complete one. A write that fails (a full disk, no
permission) raises :class:`SaveError` naming the file and the cause, after removing the temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


# Read once: os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad input from the user (a file, a flag): the message names it and says how to fix it.

    Entry scripts print these without a traceback; everything else is a bug and keeps its traceback.
    """


class SaveError(InputError):
    """A file could not be written (disk full, quota, permission): the previous version of it is unchanged.

    Entry scripts print it as one ``error:`` line and exit with code 4 (:func:`utils.cli.run_cli`).
    """

    @classmethod
    def from_os_error(cls, path: str | os.PathLike, err: OSError) -> SaveError:
        cause = err.strerror or str(err) or type(err).__name__
        return cls(f"cannot write {path}: {cause}; its previous version, if any, is unchanged. "
                   f"{_ADVICE.get(err.errno, 'Fix the cause and run again.')}")


# What to do about the usual causes of a failed write, by errno.
_ADVICE = {errno.ENOSPC: "Free space on that disk (or write elsewhere) and run again.",
           errno.EDQUOT: "Free space within your quota (or write elsewhere) and run again.",
           errno.EACCES: "Write to a folder you may write to, or change its permissions.",
           errno.EPERM: "Write to a folder you may write to, or change its permissions.",
           errno.EROFS: "That file system is read-only: write elsewhere.",
           errno.ENOTDIR: "A part of that path is a file, not a folder: pass a folder.",
           errno.EEXIST: "A part of that path is a file, not a folder: pass a folder."}


def os_error_in(err: BaseException) -> OSError | None:
    """The ``OSError`` that ``err`` is or arose from, if any.

    Writers that call back into Python, such as torch's zip writer, replace the ``OSError`` of a failed write
    with their own ``RuntimeError`` raised while handling it, so the ``OSError`` is only in the chain.
    """
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def ensure_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed; :class:`SaveError` when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveError.from_os_error(path, err) from err
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    Raises:
        SaveError: any failure to write, an ``OSError`` or an error raised while handling one (the temporary
            file is removed, ``path`` left as it was).
    """
    path = Path(path)
    ensure_folder(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions instead
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        cause = os_error_in(err)
        if cause is not None and not isinstance(err, SaveError):
            raise SaveError.from_os_error(path, cause) from err
        raise


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed: loading speed matters more than disk here), written atomically."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def load_npz(path: str | os.PathLike, keys: Iterable[str], hint: str = "") -> dict[str, np.ndarray]:
    """Load the arrays ``keys`` of an ``.npz`` file, with errors that name the file.

    Args:
        path: the file.
        keys: arrays that must be present.
        hint: appended to the "missing file" message, e.g. the command that makes the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found. {hint}".strip())
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise InputError(f"{path}: missing array(s) {missing}; it holds {sorted(npz.files)}. "
                                 f"Re-create it. {hint}".strip())
            return {k: npz[k] for k in keys}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz file ({err}); it may be truncated. "
                         f"Delete it and re-create it. {hint}".strip()) from err


class JsonlLog:
    """A JSON-lines log (one dict per line) that is rewritten atomically on every append.

    Logs are small (one line per epoch), so rewriting keeps the "old or new, never half" guarantee.
    Opening an existing log keeps its lines, which is what a resumed run wants.
    """

    def __init__(self, path: str | os.PathLike, keep_existing: bool = True):
        self.path = Path(path)
        self.lines: list[str] = []
        if keep_existing and self.path.is_file():
            self.lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]

    def truncate_after(self, key: str, value) -> None:
        """Drop records whose ``key`` exceeds ``value`` (used when resuming from an older epoch)."""
        self.lines = [ln for ln in self.lines if json.loads(ln).get(key, value) <= value]

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record, default=float))
        with atomic_write(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.lines]
