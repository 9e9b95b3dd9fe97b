"""The flags that several entry scripts share, each declared once here.

Every parser (``run_pre.py``, ``run_proto.py``, ``run_fusion.py`` / ``run_concatenation.py`` through
:mod:`trainer.meta_config`, ``run_demo.py``, ``python -m trainer.extract``) takes its common flags from these
functions, so a flag has one name, one type, one set of choices and one default wherever it appears; a script
passes only what differs (a default, the words of a help text). Backbone names come from
:data:`models.BACKBONES`; ``--dataset`` takes the four benchmarks and any folder prepared with
``python -m dataloader.prepare folder``. ``--device`` and ``--threads`` are :func:`utils.cli.add_device_flags`.
"""
from __future__ import annotations

import argparse
import math

from models import BACKBONES

BACKBONE_NAMES = tuple(sorted(BACKBONES))
SWITCH = ("auto", "on", "off")

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def in_range(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """argparse type: a ``kind`` in [low, high] (or (low, high] when ``low_open``); argparse names the flag in
    its error, e.g. ``argument --way: must be >= 1, got 0``."""
    if high < math.inf:
        bound = f"lie in [{low}, {high}]"
    else:
        bound = f"be {'>' if low_open else '>='} {low}"

    def parse(text: str):
        value = kind(text)
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"must {bound}, got {value}")
        return value
    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return parse


positive_int, non_negative_int = in_range(int, 1), in_range(int, 0)
positive_float, unit_interval = in_range(float, 0, low_open=True), in_range(float, 0, 1)


def add_data_flags(parser: Parser, model_type: str = "res12", model_help: str = "backbone",
                   data_root_help: str = "folder holding <dataset>/", dataset: bool = True) -> None:
    """``--dataset`` (unless ``dataset=False``: the demo has its own), ``--model_type`` and ``--data_root``."""
    if dataset:
        parser.add_argument("--dataset", default="mini",
                            help="prepared dataset under --data_root: mini, tiered, cifar_fs, cub, or the name of a "
                                 "folder made by python -m dataloader.prepare folder (it takes mini's choices)")
    parser.add_argument("--model_type", default=model_type, choices=BACKBONE_NAMES, help=model_help)
    parser.add_argument("--data_root", default="data", help=f"{data_root_help} (relative to the repository)")


def add_init_weights_flag(parser: Parser, purpose: str) -> None:
    """``--init_weights``: a backbone checkpoint, by default the one ``checkpoints/`` holds for the dataset."""
    parser.add_argument("--init_weights", default=None,
                        help=f"backbone checkpoint {purpose} (default checkpoints/<dataset>/<model_type>.pth)")


def add_episode_flags(parser: Parser, shot_help: str, shots: list[int] | None = None) -> None:
    """``--way`` and ``--shot`` (several values: one run or one result each)."""
    parser.add_argument("--way", type=positive_int, default=5, help="classes per episode")
    parser.add_argument("--shot", type=positive_int, nargs="+", default=shots or [1, 5], help=shot_help)


def add_episodic_training_flags(parser: Parser, trained: str, max_epoch: int) -> None:
    """The outer loop of an episodic trainer (the meta stage, the ProtoNet fine-tuning): Adam, StepLR per
    epoch, ``--max_epoch`` x ``--num_batch`` episodes, fixed validation episodes after every epoch."""
    add = parser.add_argument
    add("--vlr", type=positive_float, default=1e-3, help=f"Adam learning rate of {trained}")
    add("--step_size", type=positive_int, default=10, help="StepLR period in epochs (stepped at each epoch start)")
    add("--gamma", type=positive_float, default=0.5, help="StepLR factor")
    add("--max_epoch", type=positive_int, default=max_epoch, help="training epochs")
    add("--num_batch", type=positive_int, default=100, help="training episodes per epoch")
    add("--train_query", type=positive_int, default=15, help="queries per class in training episodes")
    add("--val_query", type=positive_int, default=15, help="queries per class in validation episodes")
    add("--val_episodes", type=positive_int, default=100, help="fixed validation episodes after every epoch")


def add_speed_flags(parser: Parser) -> None:
    """``--amp`` and ``--channels_last`` for the trainers that run a backbone (on by default on CUDA)."""
    parser.add_argument("--amp", default="auto", choices=SWITCH, help="bf16 autocast (auto: on for CUDA)")
    parser.add_argument("--channels_last", default="auto", choices=SWITCH,
                        help="channels_last memory format (auto: on for CUDA)")


def add_run_flags(parser: Parser, run_dir: str, seed: int, seed_help: str, resume_help: str | None = None,
                  deterministic: bool = True) -> None:
    """``--run_dir``, ``--seed``, and ``--resume`` / ``--deterministic`` where the trainer supports them."""
    parser.add_argument("--run_dir", default=None, help=f"run folder (default {run_dir})")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    if resume_help is not None:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    if deterministic:
        parser.add_argument("--deterministic", action="store_true",
                            help="torch.use_deterministic_algorithms and no cuDNN benchmarking: repeatable CUDA "
                                 "runs, slower (CPU runs repeat without it)")


# The original recipe's pretraining flags: run_pre.py uses them; the meta stage accepts them so that the original's
# command lines, which passed them to every script, keep working, and says that they do nothing there.
PRETRAINING_FLAGS = (
    ("pre_max_epoch", positive_int, 110, "epochs"),
    ("pre_batch_size", positive_int, 128, "images per step, over all processes together"),
    ("pre_lr", positive_float, 0.1, "initial learning rate"),
    ("pre_gamma", positive_float, 0.2, "StepLR factor"),
    ("pre_step_size", positive_int, 30, "StepLR period in epochs (stepped at each epoch start)"),
    ("pre_custom_momentum", float, 0.9, "SGD (Nesterov) momentum"),
    ("pre_custom_weight_decay", float, 5e-4, "SGD weight decay"),
)


def add_pretraining_flags(parser: Parser, used: bool = True) -> None:
    """The ``--pre_*`` flags: with the recipe's defaults when ``used``, else accepted with no default (None), so
    that :func:`unused_pretraining_flags` can tell which were given."""
    for name, kind, default, meaning in PRETRAINING_FLAGS:
        parser.add_argument(f"--{name}", type=kind, default=default if used else None,
                            help=meaning if used else f"does nothing here ({meaning} of run_pre.py)")


def unused_pretraining_flags(args: argparse.Namespace) -> None:
    """Say in one line which ``--pre_*`` flags were given to a stage that does not pretrain, and drop them."""
    given = [f"--{name}" for name, *_ in PRETRAINING_FLAGS if getattr(args, name, None) is not None]
    for name, *_ in PRETRAINING_FLAGS:
        if hasattr(args, name):
            delattr(args, name)
    if given:
        print(f"note: {' '.join(given)} configure pretraining (run_pre.py) and do nothing in this stage", flush=True)
