"""The one place that decides the device (and the speed switches derived from it), seeds every generator, and
resolves paths."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MALLOC_ENV = "TASNET_MALLOC"  # "default" leaves glibc's allocator as it is (see keep_freed_memory)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
NEVER_TRIM = 2**31 - 1  # the largest trim threshold mallopt takes (an int)


def resolve_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay; relative ones are taken from the repository root, not the working directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def resolve_device(name: str = "auto", threads: int = 0) -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Anything else is passed to ``torch.device`` and checked. On a CPU,
    glibc is then told to keep freed memory (:func:`keep_freed_memory`).

    Args:
        threads: torch's CPU threads (``--threads``); 0 keeps torch's default of one per core.
    """
    if threads < 0:
        from utils.io import InputError
        raise InputError(f"--threads must be >= 0 (0: PyTorch's default, one per core), got {threads}.")
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from utils.io import InputError
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto.")
    if device.type == "cpu":
        keep_freed_memory()
    return device


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc; None elsewhere (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it; musl and macOS have no mallopt worth setting
    except (OSError, AttributeError, TypeError):  # TypeError: Windows, where CDLL needs a name
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process: no mmap for large blocks, no trimming of the heap.

    By default glibc gives every block over 32 MiB its own mmap and unmaps it when freed, so each CPU training
    step faults all of its activations back in, zeroed, and spends almost as long in the kernel as in torch.
    Kept, the pages are reused: faster steps for a larger peak resident memory (BENCHMARKS.md, "CPU
    allocator"). Applied once per process, before the first large allocation (:func:`resolve_device` calls it
    for a CPU); forked DataLoader workers inherit it. Nothing is set where the C library is not glibc, or when
    the environment variable ``TASNET_MALLOC`` is ``default``.

    Returns:
        whether the setting was made (the one line saying so goes to stderr).
    """
    choice = os.environ.get(MALLOC_ENV, "keep")
    if choice not in ("keep", "default"):
        from utils.io import InputError
        raise InputError(f"{MALLOC_ENV}={choice}: unknown value; use keep (the default: glibc keeps freed memory "
                         f"in the process) or default (glibc's own allocator settings).")
    libc = glibc() if choice == "keep" else None
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        return False
    print(f"note: CPU memory: glibc keeps freed memory in the process (no mmap for large blocks, no trimming; "
          f"{MALLOC_ENV}=default turns this off)", file=sys.stderr, flush=True)
    return True


def flag_on(value: str, device: torch.device) -> bool:
    """An ``auto``/``on``/``off`` flag (``--amp``, ``--channels_last``): ``auto`` is on for CUDA, off elsewhere."""
    return device.type == "cuda" if value == "auto" else value == "on"


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) from one integer.

    Args:
        deterministic: also ask torch for deterministic algorithms (slower on CUDA; some ops then raise).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def git_commit() -> str:
    """The repository's current commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch (CPU, CUDA) generator states as tensors and plain data (weights_only-safe)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt_state), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
