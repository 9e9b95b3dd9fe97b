"""Pretrain a backbone on all training classes, validating with ProtoNet episodes every epoch.

    python run_pre.py --dataset mini --model_type res12                       # the original recipe
    torchrun --nproc_per_node 4 run_pre.py --dataset mini --model_type res12  # the same on 4 GPUs
    python run_pre.py --run_dir runs/<folder> --resume                        # continue an interrupted run

Ctrl-C or SIGTERM (Slurm, Kubernetes) stops the run after the current batch, saves <run_dir>/last.pth and
prints the command that continues it (exit code 130 or 143). The best backbone is ``<run_dir>/max_acc.pth``;
copy it to ``checkpoints/<dataset>/<model_type>.pth`` for the meta stage. Every flag: python run_pre.py
--help (defined in trainer/pre_flags.py). Edit the defaults below to change a run for good.
"""
from trainer.pre_flags import build_parser

parser = build_parser(__doc__)
# The original recipe (SGD Nesterov, lr 0.1, StepLR(30, 0.2), batch 128, 110 epochs) is build_parser()'s
# default; add any flag here to change it, e.g. parser.set_defaults(pre_max_epoch=120).
parser.set_defaults()


def parse_args(argv=None):
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Parse the flags and run; exit codes as :func:`utils.cli.run_cli` (bad input 2 with ``error: ...``)."""
    from trainer.pre import main as pretrain
    from utils.cli import run_cli
    run_cli(pretrain, parse_args(argv), batch_flag="--pre_batch_size")


if __name__ == "__main__":
    main()
