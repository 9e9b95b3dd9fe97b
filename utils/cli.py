"""What every entry script shares: the device flags, and how it ends (user errors as one readable line, not a
traceback from deep inside torch)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch

from utils.io import InputError, SaveError


THREADS_HELP = ("PyTorch CPU threads (0: PyTorch's default, one per core; default here %(default)s). On a CPU "
                "shared with other jobs use 1: oversubscribed threads spin-wait on each other and made the meta "
                "stage's small tensor ops up to 10x slower on a shared 2-core machine")


def add_device_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                     device_help: str = "auto, cpu, cuda or cuda:N", threads: int = 0) -> None:
    """``--device`` and ``--threads`` (default ``threads``), read by :func:`utils.runtime.resolve_device`."""
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--threads", type=int, default=threads, help=THREADS_HELP)


# Exit codes of the entry scripts besides 0 and the signal codes (130 Ctrl-C, 143 SIGTERM: utils.interrupt).
EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, EXIT_CANNOT_SAVE = 2, 3, 4


def parser_defaults(parser: argparse.ArgumentParser, **overrides) -> argparse.Namespace:
    """The namespace of ``parser`` with every flag at its default, then ``overrides`` (flag dests) set.

    How library code runs a stage as a function with its command's defaults, without building a command line.
    """
    args = parser.parse_args([])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"parser_defaults: {parser.prog} has no flag(s) {unknown}")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def run_cli(main: Callable, args, batch_flag: str = "the batch size") -> None:
    """Call ``main(args)``; user errors become one ``error: ...`` line on stderr and an exit code, no traceback.

    Exit codes: 2 bad input (:class:`InputError`), 3 the GPU ran out of memory, 4 a file could not be written
    (:class:`SaveError`: disk full, quota, permission; the file's previous version is kept).

    Args:
        batch_flag: the flag that controls memory use, named in the out-of-memory advice.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main(args)
    except SaveError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_CANNOT_SAVE)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except torch.cuda.OutOfMemoryError as err:
        print(f"error: the GPU ran out of memory ({str(err).splitlines()[0]}). Lower {batch_flag}, or free the "
              f"GPU (nvidia-smi shows who holds it).", file=sys.stderr)
        sys.exit(EXIT_OUT_OF_MEMORY)
