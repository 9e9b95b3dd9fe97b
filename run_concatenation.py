"""TasNet with the concatenation head on cached backbone features: train, then test 600 episodes.

    python run_concatenation.py                            # miniImageNet, wrn28, 1-shot and 5-shot
    python run_concatenation.py --model_type res12 --shot 1 --setting tran
    python run_concatenation.py --eval_weights runs/<run>/max_acc.pth --shot 1

As the original, the input features are L2-normalised in training episodes only (--normalize_input train,
the default through DATASET_DEFAULTS in trainer/meta_config.py), and the metric is cosine on cub and tiered.
Features come from data/<dataset>/<model_type>/feat-<split>.npz, extracted from --init_weights (default
checkpoints/<dataset>/<model_type>.pth) when missing. Every test reports both protocols: independent episodes
(reset) and the release's carried regressor (carry). Every flag: python run_concatenation.py --help (defined
in trainer/meta_config.py). Edit the defaults below to change the runs for good.
"""
import sys

from trainer.meta import cli
from trainer.meta_config import build_parser

parser = build_parser(__doc__)
# The defaults both heads share (dataset mini, --shot 1 5, way 5, --gradlr 0.01, 10 epochs x 100
# episodes, 15 queries, --vlr 1e-3, StepLR(10, 0.5)) are build_parser()'s; add any flag here to change it.
parser.set_defaults(
    head="concat",
    model_type="wrn28",       # the original concatenation script's backbone
)

if __name__ == "__main__":
    sys.exit(cli(parser))
