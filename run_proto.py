"""ProtoNet baseline of a pretrained backbone: mean support feature per class, negative squared Euclidean
distance, 600 test episodes with a 95% confidence interval. Read every TasNet result beside this one.

    python run_proto.py --dataset mini --model_type res12                   # cached features (made if missing)
    python run_proto.py --init_weights runs/<pre run>/max_acc.pth --features fresh

With ``--finetune``, the release's ProtoNet phase instead: episodic fine-tuning of the pretrained backbone
(trainer/proto_finetune.py), then the same 600 test episodes from its best-validation backbone.

    python run_proto.py --finetune --dataset mini --model_type res12 --run_dir runs/proto_ft_mini
    python run_proto.py --finetune --dataset mini --model_type res12 --run_dir runs/proto_ft_mini --resume
"""
import argparse

from dataloader.datasets import SPLITS
from trainer.flags import (add_data_flags, add_episode_flags, add_episodic_training_flags, add_init_weights_flag,
                           add_run_flags, add_speed_flags)
from utils.cli import add_device_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add("--query", type=int, default=15, help="query images per class of the test episodes")
    add("--episodes", type=int, default=600, help="test episodes")
    add("--batch_size", type=int, default=256, help="images per forward pass when extracting features")
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.finetune:
        parser.error("--resume continues a --finetune run; the baseline has nothing to resume")
    return args


def main(argv=None) -> None:
    """Parse the flags and run; bad input exits with ``error: ...`` and code 2 (no traceback)."""
    from utils.cli import run_cli
    args = parse_args(argv)
    if args.finetune:
        from trainer.proto_finetune import main as finetune
        run_cli(finetune, args, batch_flag="--train_query (training episodes) or --batch_size (evaluation)")
    else:
        from trainer.evaluate import proto_baseline
        run_cli(proto_baseline, args, batch_flag="--batch_size")


if __name__ == "__main__":
    main()
