"""What every entry script shares: the device flags, and how it ends (user errors as one readable line, not a
traceback from deep inside torch)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch

from utils.io import InputError


THREADS_HELP = ("PyTorch CPU threads (0: PyTorch's default, one per core; default here %(default)s). On a CPU "
                "shared with other jobs use 1: oversubscribed threads spin-wait on each other and made the meta "
                "stage's small tensor ops up to 10x slower on a shared 2-core machine")


def add_device_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                     device_help: str = "auto, cpu, cuda or cuda:N", threads: int = 0) -> None:
    """``--device`` and ``--threads`` (default ``threads``), read by :func:`utils.runtime.resolve_device`."""
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--threads", type=int, default=threads, help=THREADS_HELP)


def run_cli(main: Callable, args, batch_flag: str = "the batch size") -> None:
    """Call ``main(args)``; print ``error: ...`` and exit 2 on bad input, 3 when the GPU runs out of memory.

    Args:
        batch_flag: the flag that controls memory use, named in the out-of-memory advice.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError as err:
        print(f"error: the GPU ran out of memory ({str(err).splitlines()[0]}). Lower {batch_flag}, or free the "
              f"GPU (nvidia-smi shows who holds it).", file=sys.stderr)
        sys.exit(3)
