"""ProtoNet baseline of a pretrained backbone: mean support feature per class, negative squared Euclidean
distance, 600 test episodes with a 95% confidence interval. Read every TasNet result beside this one.

    python run_proto.py --dataset mini --model_type res12                   # cached features (made if missing)
    python run_proto.py --init_weights runs/<pre run>/max_acc.pth --features fresh

With ``--finetune``, the release's ProtoNet phase instead: episodic fine-tuning of the pretrained backbone
(trainer/proto_finetune.py), then the same 600 test episodes from its best-validation backbone.

    python run_proto.py --finetune --dataset mini --model_type res12 --run_dir runs/proto_ft_mini
    python run_proto.py --finetune --dataset mini --model_type res12 --run_dir runs/proto_ft_mini --resume
"""
from trainer.proto_flags import build_parser

parser = build_parser(__doc__)
# The release's values are build_parser()'s defaults; add any flag here to change it for good,
# e.g. parser.set_defaults(dataset="tiered").
parser.set_defaults()


def parse_args(argv=None):
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
