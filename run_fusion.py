"""TasNet with the fusion head on cached backbone features: train, then test 600 episodes.

    python run_fusion.py                                   # miniImageNet, res12, 1-shot and 5-shot
    python run_fusion.py --shot 1 --setting tran           # transductive
    python run_fusion.py --eval_weights runs/<run>/max_acc.pth --shot 1
    python run_fusion.py --lamda auto                      # one model per lambda of --lamda_grid, the best on validation

Features come from data/<dataset>/<model_type>/feat-<split>.npz, extracted from --init_weights (default
checkpoints/<dataset>/<model_type>.pth) when missing. Every test reports both protocols: independent episodes
(reset) and the release's carried regressor (carry). Every flag: python run_fusion.py --help (defined in
trainer/meta_config.py). Edit the defaults below to change the runs for good.
"""
import sys

from trainer.meta import cli
from trainer.meta_config import build_parser

parser = build_parser(__doc__)
# The defaults both heads share (dataset mini, --shot 1 5, way 5, --gradlr 0.01, 10 epochs x 100
# episodes, 15 queries, --vlr 1e-3, StepLR(10, 0.5)) are build_parser()'s; add any flag here to change it.
parser.set_defaults(
    head="fusion",
    model_type="res12",       # the original fusion script's backbone
    lamda=0.05,               # run_fusion.py's value (the original argparse default was 0.2)
)

if __name__ == "__main__":
    sys.exit(cli(parser))
