"""The meta stage's flags and the one config they resolve to.

:func:`build_parser` declares every flag of ``run_fusion.py`` and ``run_concatenation.py`` (the scripts only
set defaults). :meth:`MetaConfig.from_args` resolves them once per shot: ``auto`` values come from
:data:`DATASET_DEFAULTS`, the table of what the original release decided inside its models from the dataset
name (the metric, the inner StepLR, the concat head's input normalisation; see docs/release.md). The config's
fields are the flags' names, so ``config.json`` and the checkpoints record the config as it is.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace

from models.heads import HEADS, METRICS, HeadConfig
from models.inner_loop import INNER_STATES, InnerLoopConfig
from trainer.flags import (add_data_flags, add_episode_flags, add_episodic_training_flags, add_init_weights_flag,
                           add_pretraining_flags, add_run_flags, non_negative_int, positive_float,
                           positive_int, unit_interval)
from utils import InputError
from utils.cli import add_device_flags

NORMALIZE_INPUT = ("never", "train", "always")
SETTINGS = ("in", "tran")
# --lamda auto: the fusion weights tried, from the semantic part alone (0) to the projection alone (1)
LAMDA_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)

# What the original decided inside its models from the dataset name (docs/release.md), as one table. Keys are
# (head, dataset); "*" is every other dataset, a folder of your own classes included. Flags left at "auto" take
# their value from here.
DATASET_DEFAULTS = {
    ("fusion", "cub"): dict(metric="cosine", inner_step_size=10, inner_gamma=0.2, normalize_input="never"),
    ("fusion", "*"): dict(metric="euclidean", inner_step_size=10, inner_gamma=0.2, normalize_input="never"),
    ("concat", "cub"): dict(metric="cosine", inner_step_size=50, inner_gamma=0.5, normalize_input="train"),
    ("concat", "tiered"): dict(metric="cosine", inner_step_size=50, inner_gamma=0.5, normalize_input="train"),
    ("concat", "*"): dict(metric="euclidean", inner_step_size=10, inner_gamma=0.2, normalize_input="train"),
}
AUTO_KEYS = ("metric", "inner_step_size", "inner_gamma", "normalize_input")


def auto_or(kind):
    """argparse type: the string ``auto`` or a value of type ``kind``."""
    def parse(text: str):
        return text if text == "auto" else kind(text)
    parse.__name__ = f"auto or {kind.__name__}"
    return parse



def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of the meta stage, with the generic defaults; the run scripts override some of them."""
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_data_flags(parser, model_help="backbone whose cached features are used",
                   data_root_help="folder holding <dataset>/<model_type>/feat-<split>.npz and "
                                  "<dataset>/few-shot-wordemb-<split>.npz")
    add_init_weights_flag(parser, "to extract the features from when they are not cached")
    add("--extract_batch_size", type=positive_int, default=256, help="images per forward pass when extracting features")
    add("--head", default="fusion", choices=HEADS,
        help="fusion or concat (set by run_fusion.py / run_concatenation.py)")
    add_episode_flags(parser, shot_help="support samples per class; one run per value")
    add("--test_query", type=positive_int, default=15, help="queries per class in test episodes")
    add("--test_episodes", type=positive_int, default=600, help="fixed test episodes")
    add_episodic_training_flags(parser, trained="feat_learner (the visual projection)", max_epoch=10)
    add("--weight_decay", type=float, default=1e-4, help="Adam weight decay of feat_learner")
    # heads
    add("--lamda", type=auto_or(unit_interval), default=0.05,
        help="fusion: weight of the visual part, in [0, 1]; auto: train one model per value of --lamda_grid and "
             "keep the one with the best validation accuracy (the concat head has no lambda)")
    add("--lamda_grid", type=unit_interval, nargs="+", default=list(LAMDA_GRID),
        help="the values --lamda auto tries")
    add("--metric", default="auto", choices=("auto",) + METRICS,
        help="logits: negative squared Euclidean distance or cosine similarity; auto: DATASET_DEFAULTS")
    add("--normalize_input", default="auto", choices=("auto",) + NORMALIZE_INPUT,
        help="L2-normalise the input features: never, in training episodes only (the original concat "
             "head's behaviour), or always; auto: DATASET_DEFAULTS")
    add("--setting", default="in", choices=SETTINGS,
        help="in: inductive; tran: transductive (k-means on the projected queries refines the visual prototypes, "
             "in training episodes too, as the release)")
    add("--kmeans_max_iter", type=positive_int, default=1000, help="transductive k-means: Lloyd iterations at most")
    add("--kmeans_n_init", type=positive_int, default=10, help="transductive k-means: seedings per episode, best kept")
    add("--kmeans_seed", type=int, default=0, help="transductive k-means: seed of the k-means++ seeding")
    # inner loop
    add("--inner_state", default="reset", choices=INNER_STATES,
        help="reset: every episode fits the regressor from the same saved state (independent episodes, "
             "batched); carry: the original release, the regressor carries over from episode to episode")
    add("--gradlr", type=positive_float, default=0.01, help="inner-loop Adam learning rate of the semantic regressor")
    add("--inner_steps", type=non_negative_int, default=100, help="inner-loop Adam steps per episode")
    add("--inner_weight_decay", type=float, default=1e-5, help="inner-loop Adam weight decay")
    add("--inner_step_size", type=auto_or(positive_int), default="auto",
        help="inner StepLR period in steps (auto: DATASET_DEFAULTS)")
    add("--inner_gamma", type=auto_or(float), default="auto", help="inner StepLR factor (auto: DATASET_DEFAULTS)")
    add("--episode_batch", type=positive_int, default=100,
        help="episodes gathered together; on a GPU reset mode fits all their regressors at once (a CPU fits "
             "them a few at a time, see models.inner_loop.fit_batch_size); memory grows with it")
    # run
    add("--eval_weights", default=None,
        help="meta checkpoint to test without training: the max_acc.pth of this stage, or a meta checkpoint "
             "saved by the original release (use --inner_state carry to reproduce the release's number)")
    add_device_flags(parser)
    add_run_flags(parser, run_dir="runs/<head>_<dataset>_<model_type>-<time>; one shot<K>/ per shot when several "
                                  "shots are given",
                  seed=1, seed_help="seeds the model, the training episodes and the fixed validation and test "
                                    "episodes (the test episodes are run_proto.py's for the same seed)",
                  resume_help="continue an interrupted training from the last.pth that every epoch writes into "
                              "--run_dir (shot<K>/last.pth with several shots); the same flags as the interrupted run")
    add_pretraining_flags(parser.add_argument_group(
        "pretraining flags", "accepted so that the original's command lines keep working; they configure "
                             "run_pre.py and do nothing here (giving one prints a note)"), used=False)
    return parser


@dataclass(frozen=True)
class MetaConfig:
    """Every setting of one shot's training and test, resolved (no ``auto`` left); the fields are the flags.

    :attr:`head_config` and :attr:`inner` group the head's and the inner loop's settings in the form
    :class:`models.heads.TasNet` and :func:`models.inner_loop.fit_semantic_regressor` take them.
    """

    dataset: str
    model_type: str
    head: str
    way: int
    shot: int
    train_query: int
    val_query: int
    test_query: int
    max_epoch: int
    num_batch: int
    val_episodes: int
    test_episodes: int
    vlr: float                  # outer loop: Adam on feat_learner, StepLR per epoch
    weight_decay: float
    step_size: int
    gamma: float
    lamda: float
    metric: str
    normalize_input: str
    setting: str
    kmeans_max_iter: int
    kmeans_n_init: int
    kmeans_seed: int
    inner_state: str
    gradlr: float               # inner loop: Adam on word_learner, StepLR per step
    inner_steps: int
    inner_weight_decay: float
    inner_step_size: int
    inner_gamma: float
    episode_batch: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, shot: int) -> "MetaConfig":
        """Resolve the flags for one ``shot`` (``--lamda auto`` resolves to the grid's first value, which
        :func:`trainer.meta.main` replaces for each model it trains)."""
        table = DATASET_DEFAULTS.get((args.head, args.dataset), DATASET_DEFAULTS[(args.head, "*")])
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "shot"}
        values.update({key: table[key] for key in AUTO_KEYS if values[key] == "auto"})
        if values["lamda"] == "auto":
            values["lamda"] = args.lamda_grid[0]
        return cls(**values, shot=shot)

    def with_lamda(self, lamda: float) -> "MetaConfig":
        return replace(self, lamda=lamda)

    def flags(self) -> dict:
        """The config as flag name -> value: what config.json and the checkpoints record."""
        return asdict(self)

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(head=self.head, metric=self.metric, lamda=self.lamda, kmeans_max_iter=self.kmeans_max_iter,
                          kmeans_n_init=self.kmeans_n_init, kmeans_seed=self.kmeans_seed)

    @property
    def inner(self) -> InnerLoopConfig:
        return InnerLoopConfig(steps=self.inner_steps, lr=self.gradlr, weight_decay=self.inner_weight_decay,
                               step_size=self.inner_step_size, gamma=self.inner_gamma)

    def normalize(self, training: bool) -> bool:
        """Whether the input features of an episode are L2-normalised."""
        return self.normalize_input == "always" or (self.normalize_input == "train" and training)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse contradictory flags before any work, naming the flag (argparse's types check each flag alone)."""
    if len(set(args.shot)) != len(args.shot):
        raise InputError(f"--shot lists a value twice: {args.shot}.")
    if args.setting == "tran" and args.way < 2:
        raise InputError(f"--setting tran clusters the queries into k = way clusters and needs --way >= 2, "
                         f"got --way {args.way}.")
    if args.lamda == "auto" and args.head != "fusion":
        raise InputError("--lamda auto chooses the fusion head's weight; the concat head has no lambda (it "
                         "concatenates the visual and semantic parts). Drop --lamda auto.")
    if args.lamda == "auto" and args.eval_weights is not None:
        raise InputError("--lamda auto trains one model per lambda; --eval_weights tests a trained model, whose "
                         "lambda is the one it was trained with. Pass that --lamda instead.")
