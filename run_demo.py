"""The embedded demo, end to end on a CPU in minutes: draw the demo data (first run only), pretrain a small
backbone, extract its features, run the ProtoNet baseline and TasNet (fusion and concatenation) for 1 and 5
shots, and print one table of test accuracies.

    python run_demo.py                 # the full demo (about 1 minute on 2 CPU cores)
    python run_demo.py --quick         # every stage, shrunk (CI; under 3 minutes)

The run folder (default runs/demo-<time>) holds every stage's run folder with its curves, and results.md /
results.json with the table. Edit the defaults below to change the demo for good.
"""
import argparse

from dataloader.demo import DEFAULT_IMAGES_PER_CLASS
from models import INNER_STATES
from trainer.flags import add_data_flags, add_episode_flags, add_run_flags
from trainer.meta_config import build_parser as meta_parser
from utils.cli import add_device_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # data
    add("--images_per_class", type=int, default=DEFAULT_IMAGES_PER_CLASS, help="images drawn per class")
    add("--data_seed", type=int, default=0, help="seed of the demo images (the classes are fixed)")
    # pretraining: run_pre.py's recipe, shortened
    add_data_flags(parser, model_type="conv4_28", dataset=False,
                   model_help="backbone; conv4_28 (Conv-4 on the images average-pooled to 28x28, 64-d) trains at "
                              "120-220 images/s on 2 busy CPU cores, ResNet-12 (84x84) at 1-5",
                   data_root_help="the demo data go to <data_root>/demo")
    add("--pre_epochs", type=int, default=4, help="pretraining epochs (the benchmarks' recipe: 110)")
    add("--pre_lr", type=float, default=0.1, help="pretraining learning rate (SGD, Nesterov)")
    add("--pre_step_size", type=int, default=30,
        help="pretraining StepLR period in epochs (factor 0.2); 30, as run_pre.py: no decay in a short run")
    add("--pre_val_episodes", type=int, default=200, help="ProtoNet validation episodes after every epoch")
    # episodes
    add_episode_flags(parser, shot_help="support images per class; one column each")
    add("--query", type=int, default=15, help="query images per class (training, validation and test)")
    add("--test_episodes", type=int, default=600, help="test episodes, the same for every method")
    # meta stage
    add("--max_epoch", type=int, default=10, help="meta-training epochs (the paper: 10)")
    add("--num_batch", type=int, default=100, help="meta-training episodes per epoch (the paper: 100)")
    add("--val_episodes", type=int, default=50, help="meta validation episodes per epoch (the paper: 100)")
    add("--inner_state", default=meta_parser().get_default("inner_state"), choices=INNER_STATES,
        help="the semantic regressor per episode: reset (independent episodes; the meta stage's default) or "
             "carry (the original release); printed under the table")
    # run
    add_device_flags(parser, threads=1)  # one thread: the fastest on the shared 2-core machines the demo targets
    add_run_flags(parser, run_dir="runs/demo-<time>", seed=1, deterministic=False,
                  seed_help="seeds pretraining, meta-training and the fixed test episodes")
    add("--quick", action="store_true",
        help="shrink every stage for CI (see QUICK in trainer/demo.py: 20 images per class, 1 pretraining "
             "epoch, 1 x 20 meta episodes, 100 test episodes); the data go to <data_root>/quick/demo")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> None:
    """Parse the flags and run; bad input exits with ``error: ...`` and code 2 (no traceback)."""
    from trainer.demo import run_demo
    from utils.cli import run_cli
    run_cli(run_demo, parse_args(argv))


if __name__ == "__main__":
    main()
