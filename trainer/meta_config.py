"""The meta stage's flags and the one config they resolve to.

:func:`build_parser` declares every flag of ``run_fusion.py`` and ``run_concatenation.py`` (the scripts only
set defaults). :meth:`MetaConfig.from_args` resolves them once per shot: ``auto`` values come from
:data:`DATASET_DEFAULTS`, the table of what the original release decided inside its models from the dataset
name (the metric, the inner StepLR, the concat head's input normalisation; see docs/release.md), and
impossible values are refused, naming the flag. The trainer reads the config and nothing else.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

from models.heads import HEADS, METRICS, HeadConfig
from models.inner_loop import INNER_STATES, InnerLoopConfig
from trainer.flags import (add_data_flags, add_episode_flags, add_episodic_training_flags, add_init_weights_flag,
                           add_pretraining_flags, add_run_flags)
from utils import InputError
from utils.cli import add_device_flags

NORMALIZE_INPUT = ("never", "train", "always")
SETTINGS = ("in", "tran")

# What the original decided inside its models from the dataset name (docs/release.md), as one table. Keys are
# (head, dataset); "*" is every other dataset. Flags left at "auto" take their value from here.
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
    add("--extract_batch_size", type=int, default=256, help="images per forward pass when extracting features")
    add("--head", default="fusion", choices=HEADS,
        help="fusion or concat (set by run_fusion.py / run_concatenation.py)")
    add_episode_flags(parser, shot_help="support samples per class; one run per value")
    add("--test_query", type=int, default=15, help="queries per class in test episodes")
    add("--test_episodes", type=int, default=600, help="fixed test episodes")
    add_episodic_training_flags(parser, trained="feat_learner (the visual projection)", max_epoch=10)
    add("--weight_decay", type=float, default=1e-4, help="Adam weight decay of feat_learner")
    # heads
    add("--lamda", type=float, default=0.05, help="fusion: weight of the visual part (0..1); unused by concat")
    add("--metric", default="auto", choices=("auto",) + METRICS,
        help="logits: negative squared Euclidean distance or cosine similarity; auto: DATASET_DEFAULTS")
    add("--normalize_input", default="auto", choices=("auto",) + NORMALIZE_INPUT,
        help="L2-normalise the input features: never, in training episodes only (the original concat "
             "head's behaviour), or always; auto: DATASET_DEFAULTS")
    add("--setting", default="in", choices=SETTINGS,
        help="in: inductive; tran: transductive (k-means on the projected queries refines the visual prototypes, "
             "in training episodes too, as the release)")
    add("--kmeans_max_iter", type=int, default=1000, help="transductive k-means: Lloyd iterations at most")
    add("--kmeans_n_init", type=int, default=10, help="transductive k-means: seedings per episode, best kept")
    add("--kmeans_seed", type=int, default=0, help="transductive k-means: seed of the k-means++ seeding")
    # inner loop
    add("--inner_state", default="reset", choices=INNER_STATES,
        help="reset: every episode fits the regressor from the same saved state (independent episodes, "
             "batched); carry: the original release, the regressor carries over from episode to episode")
    add("--gradlr", type=float, default=0.01, help="inner-loop Adam learning rate of the semantic regressor")
    add("--inner_steps", type=int, default=100, help="inner-loop Adam steps per episode")
    add("--inner_weight_decay", type=float, default=1e-5, help="inner-loop Adam weight decay")
    add("--inner_step_size", type=auto_or(int), default="auto",
        help="inner StepLR period in steps (auto: DATASET_DEFAULTS)")
    add("--inner_gamma", type=auto_or(float), default="auto", help="inner StepLR factor (auto: DATASET_DEFAULTS)")
    add("--episode_batch", type=int, default=100,
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
                             "run_pre.py and are ignored here"), used=False)
    return parser


@dataclass(frozen=True)
class MetaConfig:
    """Every setting of one shot's training and test, resolved (no ``auto`` left) and checked.

    The fields carry the flag names; ``head`` and ``inner`` group the head's and the inner loop's settings in
    the form :class:`models.heads.TasNet` and :func:`models.inner_loop.semantic_queries` take them.
    """

    dataset: str
    model_type: str
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
    head: HeadConfig
    inner: InnerLoopConfig
    inner_state: str
    setting: str
    normalize_input: str
    episode_batch: int
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, shot: int, training: bool = True) -> "MetaConfig":
        """Resolve the flags for one ``shot`` (``training=False``: a test of --eval_weights only)."""
        table = DATASET_DEFAULTS.get((args.head, args.dataset), DATASET_DEFAULTS[(args.head, "*")])
        auto = {key: table[key] if getattr(args, key) == "auto" else getattr(args, key) for key in AUTO_KEYS}
        check_flags(args, auto, training)
        head = HeadConfig(head=args.head, metric=auto["metric"], lamda=args.lamda,
                          kmeans_max_iter=args.kmeans_max_iter, kmeans_n_init=args.kmeans_n_init,
                          kmeans_seed=args.kmeans_seed)
        inner = InnerLoopConfig(steps=args.inner_steps, lr=args.gradlr, weight_decay=args.inner_weight_decay,
                                step_size=auto["inner_step_size"], gamma=auto["inner_gamma"])
        plain = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in ("head", "inner", "shot")}
        plain["normalize_input"] = auto["normalize_input"]
        return cls(**plain, shot=shot, head=head, inner=inner)

    def flags(self) -> dict:
        """The config as flag name -> value (what config.json and the checkpoints record)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("head", "inner")}
        head, inner = asdict(self.head), self.inner
        values.update(head=head.pop("head"), **head, gradlr=inner.lr, inner_steps=inner.steps,
                      inner_weight_decay=inner.weight_decay, inner_step_size=inner.step_size,
                      inner_gamma=inner.gamma)
        return values

    def normalize(self, training: bool) -> bool:
        """Whether the input features of an episode are L2-normalised."""
        return self.normalize_input == "always" or (self.normalize_input == "train" and training)

    def outer_lr(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (1-based). The original steps StepLR at the *start* of each epoch
        (PyTorch >= 1.1 semantics), so epoch e trains at vlr * gamma^floor(e / step_size)."""
        return self.vlr * self.gamma ** (epoch // self.step_size)


def check_flags(args: argparse.Namespace, auto: dict, training: bool) -> None:
    """Refuse contradictory or impossible flags before any work, naming the flag."""
    positive = {"way": args.way, "train_query": args.train_query, "val_query": args.val_query,
                "test_query": args.test_query, "test_episodes": args.test_episodes,
                "episode_batch": args.episode_batch, "kmeans_n_init": args.kmeans_n_init,
                "kmeans_max_iter": args.kmeans_max_iter, "inner_step_size": auto["inner_step_size"]}
    if training:
        positive.update(max_epoch=args.max_epoch, num_batch=args.num_batch, val_episodes=args.val_episodes,
                        step_size=args.step_size)
    for name, value in positive.items():
        if value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}.")
    if not args.shot or min(args.shot) < 1:
        raise InputError(f"--shot must list positive numbers, got {args.shot}.")
    if len(set(args.shot)) != len(args.shot):
        raise InputError(f"--shot lists a value twice: {args.shot}.")
    if args.inner_steps < 0:
        raise InputError(f"--inner_steps must be >= 0, got {args.inner_steps}.")
    if args.gradlr <= 0 or args.vlr <= 0:
        raise InputError(f"--gradlr and --vlr must be > 0, got {args.gradlr} and {args.vlr}.")
    if not 0 <= args.lamda <= 1:
        raise InputError(f"--lamda is the weight of the visual part and must lie in [0, 1], got {args.lamda}.")
    if args.setting == "tran" and args.way < 2:
        raise InputError(f"--setting tran clusters the queries into k = way clusters and needs --way >= 2, "
                         f"got --way {args.way}.")
