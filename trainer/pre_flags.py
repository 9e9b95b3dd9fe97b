"""The flags of pretraining (``run_pre.py``, :func:`trainer.pre.main`), each defined once, with the original
release's recipe as defaults (SGD Nesterov, lr 0.1, StepLR(30, 0.2), batch 128, 110 epochs).

Library code that runs pretraining as a function (the demo, the benchmarks) takes its arguments from here with
``utils.cli.parser_defaults(build_parser(), **changes)``.
"""
from __future__ import annotations

import argparse
import os

from trainer.flags import add_data_flags, add_pretraining_flags, add_run_flags, add_speed_flags, positive_int
from utils.cli import add_device_flags


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of pretraining with the original recipe's defaults; ``run_pre.py`` may override some."""
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_data_flags(parser, model_help="backbone to pretrain", data_root_help="folder holding <dataset>/few-shot-*.npz")
    add_pretraining_flags(parser)
    # validation: ProtoNet episodes on the validation features
    add("--way", type=positive_int, default=5, help="classes per validation episode")
    add("--shot", "--val_shot", dest="shot", type=positive_int, default=1, help="support images per class")
    add("--val_query", type=positive_int, default=15, help="query images per class")
    add("--val_episodes", type=positive_int, default=600, help="validation episodes per epoch")
    add("--val_seed", type=int, default=0, help="seed of the (fixed) validation episodes")
    add("--val_batch_size", type=positive_int, default=256, help="images per forward pass when computing val features")
    # input pipeline and speed
    add("--augment", default="batch", choices=["batch", "pil", "none"],
        help="batch: batched augmentation on the device; pil: the original per-image torchvision path in "
             "DataLoader workers; none: no augmentation (eval transform), for debugging")
    add("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (pil path)")
    add("--max_train_batches", type=int, default=0, help="cap on training batches per epoch (0: no cap)")
    add_speed_flags(parser)
    add("--compile", action="store_true", help="torch.compile the model")
    # run
    add_device_flags(parser, "auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    add_run_flags(parser, run_dir="runs/pre_<dataset>_<model_type>-<time>", seed=0,
                  seed_help="seeds initialisation, data order and augmentation",
                  resume_help="continue from <run_dir>/last.pth, written after every epoch (an epoch stopped "
                              "by Ctrl-C or SIGTERM is redone from its start)")
    return parser
