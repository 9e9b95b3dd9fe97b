"""The flags of the ProtoNet stage (``run_proto.py``): the feature-based baseline of a pretrained backbone and,
with ``--finetune``, the release's ProtoNet phase (:mod:`trainer.proto_finetune`).

Library code that runs it as a function (the demo) takes its arguments from here with
``utils.cli.parser_defaults(build_parser(), **changes)``.
"""
from __future__ import annotations

import argparse

from dataloader.datasets import SPLITS
from trainer.flags import (add_data_flags, add_episode_flags, add_episodic_training_flags, add_init_weights_flag,
                           add_run_flags, add_speed_flags, positive_int)
from utils.cli import add_device_flags


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of run_proto.py, with the release's values as defaults."""
    parser = argparse.ArgumentParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_data_flags(parser)
    add_init_weights_flag(parser, "to evaluate, or to start from with --finetune")
    add("--features", default="cache", choices=["cache", "fresh"],
        help="cache: data/<dataset>/<model_type>/feat-<split>.npz, extracted from --init_weights when missing; "
             "fresh: extract the split from --init_weights in memory, leaving the cache alone (unused by "
             "--finetune, which always computes its features)")
    add("--split", default="test", choices=SPLITS, help="split to evaluate")
    add_episode_flags(parser, shot_help="support images per class (one result each; with --finetune one run each, "
                                        "in shot<K>/ when several)")
    add("--query", type=positive_int, default=15, help="query images per class of the test episodes")
    add("--episodes", type=positive_int, default=600, help="test episodes")
    add("--batch_size", type=positive_int, default=256, help="images per forward pass when extracting features")
    add_device_flags(parser)
    add_run_flags(parser, run_dir="runs/proto_<dataset>_<model>-<time>; with --finetune "
                                  "runs/proto_finetune_<dataset>_<model>-<time>",
                  seed=1, seed_help="seed of the (fixed) test episodes; with --finetune also of the training and "
                                    "validation episodes", deterministic=False)
    # the release's ProtoNet phase: episodic fine-tuning of the backbone (its run script's values)
    tune = parser.add_argument_group("episodic fine-tuning (--finetune)")
    tune.add_argument("--finetune", action="store_true",
                      help="fine-tune the backbone on ProtoNet episodes before testing (the release's ProtoNet "
                           "phase); without it the backbone is evaluated as it is")
    add_episodic_training_flags(tune, trained="the backbone (no weight decay)", max_epoch=100)
    add_speed_flags(tune)
    tune.add_argument("--resume", action="store_true",
                      help="continue an interrupted fine-tuning from the last.pth in --run_dir (shot<K>/last.pth "
                           "with several shots); the same flags as the interrupted run")
    return parser
