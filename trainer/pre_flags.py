"""The flags of pretraining (``run_pre.py``, :func:`trainer.pre.main`), each defined once, with the original
release's recipe as defaults (SGD Nesterov, lr 0.1, StepLR(30, 0.2), batch 128, 110 epochs).

Library code that runs pretraining as a function (the demo, the benchmarks) takes its arguments from here with
``utils.cli.parser_defaults(build_parser(), **changes)``.
"""
from __future__ import annotations

import argparse
import os

from dataloader.datasets import DATASETS
from models import BACKBONES
from utils.cli import add_device_flags


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of pretraining with the original recipe's defaults; ``run_pre.py`` may override some."""
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data and model
    add("--dataset", default="mini", choices=DATASETS, help="prepared dataset under --data_root")
    add("--model_type", default="res12", choices=sorted(BACKBONES), help="backbone to pretrain")
    add("--data_root", default="data", help="folder holding <dataset>/few-shot-*.npz (relative to the repo)")
    # the original recipe
    add("--pre_max_epoch", type=int, default=110, help="epochs")
    add("--pre_batch_size", type=int, default=128, help="images per step, over all processes together")
    add("--pre_lr", type=float, default=0.1, help="initial learning rate")
    add("--pre_gamma", type=float, default=0.2, help="StepLR factor")
    add("--pre_step_size", type=int, default=30, help="StepLR period in epochs (stepped at each epoch start)")
    add("--pre_custom_momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    add("--pre_custom_weight_decay", type=float, default=5e-4, help="SGD weight decay")
    # validation: ProtoNet episodes on the validation features
    add("--way", type=int, default=5, help="classes per validation episode")
    add("--shot", "--val_shot", dest="shot", type=int, default=1, help="support images per class")
    add("--val_query", type=int, default=15, help="query images per class")
    add("--val_episodes", type=int, default=600, help="validation episodes per epoch")
    add("--val_seed", type=int, default=0, help="seed of the (fixed) validation episodes")
    add("--val_batch_size", type=int, default=256, help="images per forward pass when computing val features")
    # input pipeline and speed
    add("--augment", default="batch", choices=["batch", "pil", "none"],
        help="batch: batched augmentation on the device; pil: the original per-image torchvision path in "
             "DataLoader workers; none: no augmentation (eval transform), for debugging")
    add("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (pil path)")
    add("--max_train_batches", type=int, default=0, help="cap on training batches per epoch (0: no cap)")
    add("--amp", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on for CUDA)")
    add("--channels_last", default="auto", choices=["auto", "on", "off"],
        help="channels_last memory format (auto: on for CUDA)")
    add("--compile", action="store_true", help="torch.compile the model")
    # run
    add_device_flags(parser, "auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    add("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation")
    add("--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms and no cuDNN benchmarking: repeatable CUDA runs, slower "
             "(CPU runs repeat without it)")
    add("--run_dir", default=None, help="run folder (default runs/pre_<dataset>_<model_type>-<time>)")
    add("--resume", action="store_true",
        help="continue from <run_dir>/last.pth, written after every epoch and when Ctrl-C or SIGTERM stops the run")
    return parser
