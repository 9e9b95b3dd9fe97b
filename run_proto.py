"""ProtoNet baseline of a pretrained backbone: mean support feature per class, negative squared Euclidean
distance, 600 test episodes with a 95% confidence interval. Read every TasNet result beside this one.

    python run_proto.py --dataset mini --model_type res12                   # cached features (made if missing)
    python run_proto.py --init_weights runs/<pre run>/max_acc.pth --features fresh
"""
import argparse

from dataloader.datasets import DATASETS, SPLITS
from models import BACKBONES
from utils.cli import add_device_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="mini", choices=DATASETS, help="prepared dataset under --data_root")
    add("--model_type", default="res12", choices=sorted(BACKBONES), help="backbone")
    add("--data_root", default="data", help="folder holding <dataset>/ (relative to the repo)")
    add("--init_weights", default=None, help="backbone checkpoint (default checkpoints/<dataset>/<model_type>.pth)")
    add("--features", default="cache", choices=["cache", "fresh"],
        help="cache: data/<dataset>/<model_type>/feat-<split>.npz, extracted from --init_weights when missing; "
             "fresh: extract the split from --init_weights in memory, leaving the cache alone")
    add("--split", default="test", choices=SPLITS, help="split to evaluate")
    add("--way", type=int, default=5, help="classes per episode")
    add("--shot", type=int, nargs="+", default=[1, 5], help="support images per class (one result each)")
    add("--query", type=int, default=15, help="query images per class")
    add("--episodes", type=int, default=600, help="test episodes")
    add("--seed", type=int, default=1, help="seed of the (fixed) test episodes")
    add("--batch_size", type=int, default=256, help="images per forward pass when extracting features")
    add_device_flags(parser)
    add("--run_dir", default=None, help="run folder for result.json (default runs/proto_<dataset>_<model>-<time>)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    """Parse the flags and run; bad input exits with ``error: ...`` and code 2 (no traceback)."""
    from trainer.evaluate import proto_baseline
    from utils.cli import run_cli
    run_cli(proto_baseline, parse_args(argv), batch_flag="--batch_size")


if __name__ == "__main__":
    main()
