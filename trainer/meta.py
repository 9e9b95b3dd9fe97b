"""The one episodic trainer of the meta stage (DESIGN A5), for both heads (fusion and concatenation).

On cached backbone features (640-d; 64-d for Conv-4): ``max_epoch`` x ``num_batch`` training episodes (outer loop: Adam on
``feat_learner``, cross-entropy on the query logits), ``val_episodes`` fixed validation episodes after every
epoch, the best-validation model kept as ``max_acc.pth``; then ``test_episodes`` fixed test episodes from
``max_acc.pth``, reported as mean and 95% CI (``Test Acc 0.xxxx + 0.xxxx``). With ``--eval_weights`` only the
test runs, from the given meta checkpoint.

Every flag is defined once here (:func:`build_parser`); ``run_fusion.py`` and ``run_concatenation.py`` only
set their defaults. What the original hard-coded per dataset inside its models (the metric, the inner
StepLR, the concat head's input normalisation) is the table :data:`DATASET_DEFAULTS`, used by the flags whose
value is ``auto``.

Behaviour of the original release kept on purpose (DESIGN A5), each with a flag:

- ``--inner_state carry``: the regressor ``word_learner`` is never re-initialised; its fit carries over from
  episode to episode (training, validation and test) and is saved in ``max_acc.pth``. Each test episode then
  learns from the support sets of all earlier ones, so the test is not one of independent episodes.
  ``--inner_state reset`` starts every episode from the same saved state (independent, batched episodes).
- ``--normalize_input train`` (concat default): the input features are L2-normalised in the training
  episodes only, not in validation or test.
- ``--setting tran``: transductive refinement of the visual prototypes (k-means on the projected queries), in
  training, validation and test episodes alike, with no gradient through the refined prototypes.
- ``--eval_weights`` also takes the release's own meta checkpoints; with ``--inner_state carry`` the test
  continues the regressor the release carried, as its own evaluation does.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dataloader.datasets import DATASETS, FeatureSplit, feature_path, load_features, prepare_hint
from dataloader.sampler import EpisodeSampler, split_episode
from models.heads import HEADS, METRICS, HeadConfig, TasNet
from models.inner_loop import INNER_STATES, InnerLoopConfig, semantic_queries
from trainer.checkpoint import load_checkpoint, load_weights, save_checkpoint, strip_prefixes
from trainer.evaluate import episode_accuracy, episode_indices
from trainer.runs import RunFolder, default_run_dir
from utils import InputError, mean_ci95, resolve_device, resolve_path, set_seed
from utils.runtime import rng_state, set_rng_state
from utils.cli import add_device_flags, run_cli

MODEL_TYPES = ("res12", "wrn28", "conv4", "conv4_28")  # conv4*: the demo's CPU-sized backbones (64-d)
NORMALIZE_INPUT = ("never", "train", "always")
SETTINGS = ("in", "tran")

# What the original decided inside its models from the dataset name (DESIGN A5), as one table. Keys are
# (head, dataset); "*" is every other dataset. Flags left at "auto" take their value from here.
DATASET_DEFAULTS = {
    ("fusion", "cub"): dict(metric="cosine", inner_step_size=10, inner_gamma=0.2, normalize_input="never"),
    ("fusion", "*"): dict(metric="euclidean", inner_step_size=10, inner_gamma=0.2, normalize_input="never"),
    ("concat", "cub"): dict(metric="cosine", inner_step_size=50, inner_gamma=0.5, normalize_input="train"),
    ("concat", "tiered"): dict(metric="cosine", inner_step_size=50, inner_gamma=0.5, normalize_input="train"),
    ("concat", "*"): dict(metric="euclidean", inner_step_size=10, inner_gamma=0.2, normalize_input="train"),
}
AUTO_KEYS = ("metric", "inner_step_size", "inner_gamma", "normalize_input")

# Offsets that give the training, validation and test episodes their own streams from one --seed; the test
# episodes use --seed itself, so they are the ProtoNet baseline's (run_proto.py) for the same seed.
TRAIN_SEED_OFFSET, VAL_SEED_OFFSET = 1_000_003, 2_000_003

# Flags that --resume must find unchanged: they shape the training that last.pth continues (--max_epoch may grow).
RESUME_KEYS = ("dataset", "model_type", "head", "way", "shot", "train_query", "val_query", "num_batch",
               "val_episodes", "seed", "vlr", "weight_decay", "step_size", "gamma", "lamda", "metric",
               "normalize_input", "inner_state", "gradlr", "inner_steps", "inner_weight_decay",
               "inner_step_size", "inner_gamma")


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
    # data
    add("--dataset", default="mini", choices=DATASETS, help="prepared dataset under --data_root")
    add("--model_type", default="res12", choices=MODEL_TYPES, help="backbone whose cached features are used")
    add("--data_root", default="data",
        help="folder holding <dataset>/<model_type>/feat-<split>.npz and <dataset>/few-shot-wordemb-<split>.npz "
             "(relative to the repository)")
    add("--init_weights", default=None,
        help="backbone checkpoint to extract the features from when they are not cached "
             "(default checkpoints/<dataset>/<model_type>.pth)")
    add("--extract_batch_size", type=int, default=256, help="images per forward pass when extracting features")
    # episodes
    add("--head", default="fusion", choices=HEADS,
        help="fusion or concat (set by run_fusion.py / run_concatenation.py)")
    add("--way", type=int, default=5, help="classes per episode")
    add("--shot", type=int, nargs="+", default=[1, 5], help="support samples per class; one run per value")
    add("--train_query", type=int, default=15, help="queries per class in training episodes")
    add("--val_query", type=int, default=15, help="queries per class in validation episodes")
    add("--test_query", type=int, default=15, help="queries per class in test episodes")
    add("--max_epoch", type=int, default=10, help="training epochs")
    add("--num_batch", type=int, default=100, help="training episodes per epoch")
    add("--val_episodes", type=int, default=100, help="fixed validation episodes after every epoch")
    add("--test_episodes", type=int, default=600, help="fixed test episodes")
    # outer loop
    add("--vlr", type=float, default=1e-3, help="Adam learning rate of feat_learner (the visual projection)")
    add("--weight_decay", type=float, default=1e-4, help="Adam weight decay of feat_learner")
    add("--step_size", type=int, default=10, help="StepLR period of the outer loop in epochs")
    add("--gamma", type=float, default=0.5, help="StepLR factor of the outer loop")
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
    add("--run_dir", default=None,
        help="run folder (default runs/<head>_<dataset>_<model_type>-<time>); one shot<K>/ per shot when "
             "several shots are given")
    add_device_flags(parser)
    add("--seed", type=int, default=1,
        help="seeds the model, the training episodes and the fixed validation and test episodes (the test "
             "episodes are run_proto.py's for the same seed)")
    add("--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms: repeatable CUDA runs, slower (CPU runs repeat without it)")
    add("--resume", action="store_true",
        help="continue an interrupted training from the last.pth that every epoch writes into --run_dir "
             "(shot<K>/last.pth with several shots); the same flags as the interrupted run")
    pre = parser.add_argument_group("pretraining flags", "accepted so that the original's command lines keep "
                                                         "working; they configure run_pre.py and are ignored here")
    for name, kind in (("pre_max_epoch", int), ("pre_batch_size", int), ("pre_lr", float), ("pre_gamma", float),
                       ("pre_step_size", int), ("pre_custom_momentum", float), ("pre_custom_weight_decay", float)):
        pre.add_argument(f"--{name}", type=kind, default=None, help="ignored by the meta stage (see run_pre.py)")
    return parser


def resolve_auto(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the ``auto`` flags from :data:`DATASET_DEFAULTS` (a copy; the input is left as it is)."""
    resolved = argparse.Namespace(**vars(args))
    table = DATASET_DEFAULTS.get((args.head, args.dataset), DATASET_DEFAULTS[(args.head, "*")])
    for key in AUTO_KEYS:
        if getattr(resolved, key) == "auto":
            setattr(resolved, key, table[key])
    return resolved


def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or impossible flags before any work, naming the flag."""
    positive = {"way": args.way, "train_query": args.train_query, "val_query": args.val_query,
                "test_query": args.test_query, "test_episodes": args.test_episodes,
                "episode_batch": args.episode_batch, "kmeans_n_init": args.kmeans_n_init,
                "kmeans_max_iter": args.kmeans_max_iter, "inner_step_size": args.inner_step_size}
    if args.eval_weights is None:
        positive.update(max_epoch=args.max_epoch, num_batch=args.num_batch, val_episodes=args.val_episodes)
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
    if args.resume and (args.run_dir is None or args.eval_weights is not None):
        raise InputError("--resume continues an interrupted training: pass the --run_dir of that run, and no "
                         "--eval_weights.")


def check_episode_sizes(args: argparse.Namespace, splits: dict[str, FeatureSplit]) -> None:
    """Refuse a --way, --shot or query count that a split cannot fill, before training rather than after it."""
    queries = {"train": args.train_query, "val": args.val_query, "test": args.test_query}
    for name, split in splits.items():
        for shot in args.shot:
            EpisodeSampler(split.targets.cpu(), args.way, shot, queries[name], 1,
                           name=f"{split.name} ({name} split, --{name}_query {queries[name]})")


@dataclass(frozen=True)
class MetaConfig:
    """The method's settings for one shot, resolved from the flags (no ``auto`` left)."""

    head: HeadConfig
    inner: InnerLoopConfig
    inner_state: str
    setting: str
    normalize_input: str
    way: int
    shot: int
    episode_batch: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, shot: int) -> "MetaConfig":
        args = resolve_auto(args)
        head = HeadConfig(head=args.head, metric=args.metric, lamda=args.lamda, kmeans_max_iter=args.kmeans_max_iter,
                          kmeans_n_init=args.kmeans_n_init, kmeans_seed=args.kmeans_seed)
        inner = InnerLoopConfig(steps=args.inner_steps, lr=args.gradlr, weight_decay=args.inner_weight_decay,
                                step_size=args.inner_step_size, gamma=args.inner_gamma)
        return cls(head, inner, args.inner_state, args.setting, args.normalize_input, args.way, shot,
                   args.episode_batch)

    def normalize(self, training: bool) -> bool:
        return self.normalize_input == "always" or (self.normalize_input == "train" and training)


@dataclass
class EpisodeBatch:
    """B episodes gathered from a feature split, everything on the split's device.

    support (B, way*shot, F), query (B, way*query, F), semantic_protos (B, way, D),
    support_targets (B, way*shot, D), query_labels (way*query,).
    """

    support: torch.Tensor
    query: torch.Tensor
    semantic_protos: torch.Tensor
    support_targets: torch.Tensor
    query_labels: torch.Tensor


def gather_episodes(split: FeatureSplit, indices: torch.Tensor, config: MetaConfig, query: int,
                    training: bool) -> EpisodeBatch:
    """Look up B episodes (indices (B, way*(shot+query)), shot-major) in the split's features."""
    data = split.features[indices]
    if config.normalize(training):
        data = F.normalize(data, dim=-1)
    episode = split_episode(data, config.way, config.shot, query)
    classes = split.targets[indices[:, :config.way]]                     # (B, way): class of label j
    semantic_protos = split.class_vectors[classes]
    support_targets = semantic_protos[:, episode.support_labels]
    return EpisodeBatch(episode.support, episode.query, semantic_protos, support_targets, episode.query_labels)


def episode_semantics(model: TasNet, batch: EpisodeBatch, config: MetaConfig) -> torch.Tensor:
    """The inner loop on every episode of the batch: (B, way*query, D) semantic queries."""
    return semantic_queries(model.word_learner, batch.support, batch.support_targets, batch.query, config.inner,
                            config.inner_state)


@torch.no_grad()
def evaluate(model: TasNet, split: FeatureSplit, indices: torch.Tensor, config: MetaConfig, query: int) -> torch.Tensor:
    """Accuracy of every episode: indices (E, way*(shot+query)) -> (E,) accuracies, in episode order.

    In carry mode the regressor is fitted in place through the episodes in this order, as the original.
    """
    model.eval()
    accuracies = []
    for chunk in indices.split(config.episode_batch):
        batch = gather_episodes(split, chunk, config, query, training=False)
        semantic_query = episode_semantics(model, batch, config)
        logits = model(batch.support, batch.query, batch.semantic_protos, semantic_query, config.shot,
                       transductive=config.setting == "tran")
        accuracies.append(episode_accuracy(logits, batch.query_labels))
    return torch.cat(accuracies)


def train_epoch(model: TasNet, optimizer: torch.optim.Optimizer, split: FeatureSplit, indices: torch.Tensor,
                config: MetaConfig, query: int) -> tuple[float, float]:
    """One outer step per episode; returns the mean query loss and accuracy over the epoch's episodes."""
    model.train()
    losses, accuracies = [], []
    for chunk in indices.split(config.episode_batch):
        batch = gather_episodes(split, chunk, config, query, training=True)
        # The regressor's fit does not depend on feat_learner, so the chunk's inner loops can run first.
        semantic_query = episode_semantics(model, batch, config)
        for b in range(chunk.shape[0]):
            logits = model(batch.support[b], batch.query[b], batch.semantic_protos[b], semantic_query[b],
                           config.shot, transductive=config.setting == "tran")
            loss = F.cross_entropy(logits, batch.query_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            accuracies.append(episode_accuracy(logits.detach(), batch.query_labels))
    return float(torch.stack(losses).mean()), float(torch.stack(accuracies).mean())


def outer_lr(epoch: int, args: argparse.Namespace) -> float:
    """Learning rate of epoch ``epoch`` (1-based). The original steps StepLR at the *start* of each epoch
    (PyTorch >= 1.1 semantics), so epoch e trains at vlr * gamma^floor(e / step_size)."""
    return args.vlr * args.gamma ** (epoch // args.step_size)


def load_splits(args: argparse.Namespace, splits: Sequence[str], device: torch.device) -> dict[str, FeatureSplit]:
    """The cached feature splits on ``device``, extracted from the backbone checkpoint first when missing."""
    from trainer.extract import default_weights, ensure_features

    missing = [s for s in splits if not feature_path(args.data_root, args.dataset, args.model_type, s).is_file()]
    if missing:
        weights = resolve_path(args.init_weights) if args.init_weights else default_weights(args.dataset,
                                                                                            args.model_type)
        if not weights.is_file():
            folder = feature_path(args.data_root, args.dataset, args.model_type, missing[0]).parent
            images = folder.parent / "few-shot-train.npz"
            prepare = "" if images.is_file() else (f" First prepare the images ({images} is missing). "
                                                   f"{prepare_hint(args.dataset, folder.parent)}.")
            raise InputError(
                f"{folder}: no cached features for split(s) {', '.join(missing)}, and no backbone checkpoint at "
                f"{weights} to extract them from.{prepare} Pretrain one with: python run_pre.py --dataset "
                f"{args.dataset} "
                f"--model_type {args.model_type} --data_root {args.data_root} (then copy its max_acc.pth to "
                f"{weights}, or pass it as --init_weights), or extract the features yourself with: python -m "
                f"trainer.extract --dataset {args.dataset} --model_type {args.model_type} --data_root "
                f"{args.data_root} --init_weights <backbone checkpoint>.")
        print(f"extracting {args.model_type} features of {args.dataset} ({', '.join(missing)}) from {weights}")
        ensure_features(args.data_root, args.dataset, args.model_type, weights, device, args.extract_batch_size)
    loaded = {s: load_features(args.data_root, args.dataset, args.model_type, s).to(device) for s in splits}
    dims = {s: (tuple(loaded[s].features.shape[1:]), loaded[s].class_vectors.shape[1]) for s in splits}
    if len(set(dims.values())) > 1:
        raise InputError(f"{args.dataset}/{args.model_type}: the splits disagree on the feature or class-vector "
                         f"size ((feature shape, D) per split: {dims}); re-create them with one backbone and one "
                         f"word-vector file.")
    return loaded


def build_model(config: MetaConfig, feature_dim: int, semantic_dim: int, device: torch.device) -> TasNet:
    return TasNet(feature_dim, semantic_dim, config.head).to(device)


def load_meta_model(path: str | Path, config: MetaConfig, feature_dim: int, semantic_dim: int,
                    device: torch.device) -> tuple[TasNet, dict]:
    """A model with the weights of the meta checkpoint ``path``, checked against the data and the head."""
    path = resolve_path(path)
    ckpt = load_checkpoint(path, map_location=device)
    params = strip_prefixes(ckpt["params"])
    if ckpt.get("kind") == "backbone" or "feat_learner.weight" not in params:
        raise InputError(f"{path}: this is not a meta checkpoint (no feat_learner weights; it looks like a "
                         f"backbone). Pass a backbone as --init_weights; --eval_weights takes the max_acc.pth "
                         f"of a run_fusion.py / run_concatenation.py run.")
    found_dim = params["feat_learner.weight"].shape[0]
    if found_dim != semantic_dim:
        raise InputError(f"{path}: the model maps to D = {found_dim} but the class vectors of this dataset have "
                         f"D = {semantic_dim}; it was trained with another word-vector file or dataset.")
    if ckpt.get("head", config.head.head) != config.head.head:
        script = "run_fusion.py" if ckpt["head"] == "fusion" else "run_concatenation.py"
        raise InputError(f"{path}: trained with the {ckpt['head']} head, but this run uses the {config.head.head} "
                         f"head; evaluate it with {script}.")
    model = build_model(config, feature_dim, semantic_dim, device)
    load_weights(model, path, map_location=device, kind="meta")
    return model, ckpt


class MetaRun:
    """Training and testing of one shot setting in its run folder."""

    def __init__(self, args: argparse.Namespace, shot: int, splits: dict[str, FeatureSplit], run_dir: Path,
                 device: torch.device):
        self.args, self.shot, self.splits, self.device = args, shot, splits, device
        self.config = MetaConfig.from_args(args, shot)
        self.resolved = resolve_auto(args)
        any_split = next(iter(splits.values()))
        self.feature_dim, self.semantic_dim = any_split.features.shape[1], any_split.class_vectors.shape[1]
        self.run = RunFolder(run_dir, {**vars(self.resolved), "shot": shot, "device": str(device),
                                       "semantic_dim": self.semantic_dim}, resume=args.resume)
        self.checkpoint = self.run.path / "max_acc.pth"
        self.last = self.run.path / "last.pth"

    def episodes(self, split: str, query: int, count: int, seed: int) -> torch.Tensor:
        """The fixed episodes of a split for a seed: (count, way*(shot+query)) indices on the device."""
        data = self.splits[split]
        return episode_indices(data.targets.cpu(), self.config.way, self.shot, query, count, seed,
                               name=f"{self.args.dataset} {split}").to(self.device)

    def save(self, model: TasNet, epoch: int, val_acc: float, path: Path | None = None, **extra) -> None:
        save_checkpoint(path or self.checkpoint, model.state_dict(), **extra, kind="meta", head=self.config.head.head,
                        semantic_dim=self.semantic_dim, feature_dim=self.feature_dim, epoch=epoch, val_acc=val_acc,
                        inner_state=self.config.inner_state, config={**vars(self.resolved), "shot": self.shot})

    def train(self) -> tuple[float, int]:
        """Train ``max_epoch`` epochs; returns the best validation accuracy and its epoch."""
        args, config = self.args, self.config
        model = build_model(config, self.feature_dim, self.semantic_dim, self.device)
        optimizer = torch.optim.Adam(model.feat_learner.parameters(), lr=args.vlr, weight_decay=args.weight_decay)
        train = self.splits["train"]
        sampler = EpisodeSampler(train.targets.cpu(), config.way, self.shot, args.train_query, args.num_batch,
                                 name=f"{args.dataset} train")
        generator = torch.Generator().manual_seed(args.seed + TRAIN_SEED_OFFSET)
        val_indices = self.episodes("val", args.val_query, args.val_episodes, args.seed + VAL_SEED_OFFSET)
        best_acc, best_epoch, first_epoch = -1.0, 0, 1
        if args.resume:
            best_acc, best_epoch, first_epoch = self.restore(model, optimizer, generator)
        try:
            for epoch in range(first_epoch, args.max_epoch + 1):
                best_acc, best_epoch = self.train_one_epoch(epoch, model, optimizer, sampler, generator, val_indices,
                                                            best_acc, best_epoch)
        except KeyboardInterrupt:
            done = f"epoch {epoch - 1} is the last complete one" if self.last.is_file() else "no epoch completed"
            print(f"\ninterrupted in epoch {epoch} ({done}); continue with --resume --run_dir {args.run_dir}",
                  file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        return best_acc, best_epoch

    def train_one_epoch(self, epoch: int, model: TasNet, optimizer: torch.optim.Optimizer, sampler: EpisodeSampler,
                        generator: torch.Generator, val_indices: torch.Tensor, best_acc: float,
                        best_epoch: int) -> tuple[float, int]:
        """Train, validate, keep the best model, log; then ``last.pth``. Returns the best accuracy and epoch."""
        args, config, train = self.args, self.config, self.splits["train"]
        lr = outer_lr(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        indices = sampler.sample(args.num_batch, generator).to(self.device)
        loss, acc = train_epoch(model, optimizer, train, indices, config, args.train_query)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        val_acc, val_ci = mean_ci95(evaluate(model, self.splits["val"], val_indices, config,
                                             args.val_query).tolist())
        val_seconds = time.perf_counter() - started
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            self.save(model, epoch, val_acc)
        self.run.record({"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                         "val_ci95": val_ci, "best_val_acc": best_acc,
                         "train_episodes_per_s": args.num_batch / train_seconds,
                         "val_episodes_per_s": args.val_episodes / val_seconds})
        print(f"[{args.head} {self.shot}-shot] epoch {epoch}/{args.max_epoch}: lr {lr:.3g} loss {loss:.4f} "
              f"train acc {acc:.4f} val acc {val_acc:.4f} + {val_ci:.4f} (best {best_acc:.4f} at epoch "
              f"{best_epoch}) {args.num_batch / train_seconds:.1f} train episodes/s", flush=True)
        # last: a kill from here on resumes after this epoch; before it, this epoch is redone identically
        self.save(model, epoch, val_acc, path=self.last, optimizer=optimizer.state_dict(),
                  generator=generator.get_state(), rng=rng_state(self.device), best_acc=best_acc,
                  best_epoch=best_epoch)
        return best_acc, best_epoch

    def restore(self, model: TasNet, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> tuple[float, int, int]:
        """``--resume``: load ``last.pth``; returns the best accuracy, its epoch and the first epoch to run."""
        if not self.last.is_file():
            print(f"note: {self.last} not found: the {self.shot}-shot training starts from epoch 1", flush=True)
            self.run.log.truncate_after("epoch", 0)
            return -1.0, 0, 1
        ckpt = load_weights(model, self.last, map_location=self.device, kind="meta")
        if "optimizer" not in ckpt:
            raise InputError(f"--resume: {self.last} holds no training state; start a new --run_dir.")
        saved, current = ckpt.get("config", {}), {**vars(self.resolved), "shot": self.shot}
        changed = [f"--{key} {saved.get(key)} -> {current[key]}" for key in RESUME_KEYS
                   if saved.get(key) != current[key]]
        if changed:
            raise InputError(f"--resume: {self.last} was trained with other values of {', '.join(changed)}; "
                             f"resume with the flags the run started with, or start a new --run_dir.")
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"], self.device)
        epoch = int(ckpt["epoch"])
        self.run.log.truncate_after("epoch", epoch)
        print(f"resuming {self.run.path} after epoch {epoch}", flush=True)
        return float(ckpt["best_acc"]), int(ckpt["best_epoch"]), epoch + 1

    def test(self, weights: Path) -> dict:
        """Test the meta checkpoint ``weights`` on the fixed test episodes; writes and returns result.json."""
        args, config = self.args, self.config
        model, ckpt = load_meta_model(weights, config, self.feature_dim, self.semantic_dim, self.device)
        if ckpt.get("release") and config.inner_state == "reset":
            print(f"note: {weights} is a release checkpoint; the release's own test accuracy comes from "
                  f"--inner_state carry (its regressor carried on from this saved state), not reset")
        elif ckpt.get("inner_state") not in (None, config.inner_state):
            print(f"note: {weights} was trained with --inner_state {ckpt['inner_state']}; testing with "
                  f"--inner_state {config.inner_state}")
        indices = self.episodes("test", args.test_query, args.test_episodes, args.seed)
        started = time.perf_counter()
        accuracies = evaluate(model, self.splits["test"], indices, config, args.test_query)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        test_acc, test_ci = mean_ci95(accuracies.tolist())
        result = {
            "test_acc": test_acc, "test_ci95": test_ci, "test_episodes": args.test_episodes,
            "val_best_acc": ckpt.get("val_acc"), "val_best_epoch": ckpt.get("epoch"),
            "dataset": args.dataset, "model_type": args.model_type, "head": config.head.head, "shot": self.shot,
            "way": config.way, "test_query": args.test_query, "setting": config.setting,
            "inner_state": config.inner_state, "trained_inner_state": ckpt.get("inner_state"),
            "metric": config.head.metric, "lamda": config.head.lamda, "normalize_input": config.normalize_input,
            "semantic_dim": self.semantic_dim, "seed": args.seed, "episodes_per_s": args.test_episodes / seconds,
            "weights": str(weights), "device": str(self.device),
        }
        self.run.save_result(result)
        print(f"Test Acc {test_acc:.4f} + {test_ci:.4f}  ({config.head.head}, {args.dataset}/{args.model_type}, "
              f"{config.way}-way {self.shot}-shot, setting {config.setting}, inner_state {config.inner_state}, "
              f"{args.test_episodes} episodes, {args.test_episodes / seconds:.1f} episodes/s)", flush=True)
        return result


def main(args: argparse.Namespace) -> list[dict]:
    """Train (unless ``--eval_weights``) and test every shot of ``args.shot``; returns the result dicts."""
    check_args(resolve_auto(args))
    device = resolve_device(args.device, args.threads)
    if args.eval_weights is not None and not resolve_path(args.eval_weights).is_file():
        raise InputError(f"--eval_weights {args.eval_weights}: file not found.")
    if args.resume and not resolve_path(args.run_dir).is_dir():
        raise InputError(f"--resume: run folder {resolve_path(args.run_dir)} not found.")
    splits = load_splits(args, ("test",) if args.eval_weights else ("train", "val", "test"), device)
    check_episode_sizes(args, splits)
    run_dir = resolve_path(args.run_dir) if args.run_dir else default_run_dir(args.head, args.dataset,
                                                                               args.model_type)
    results = []
    for shot in args.shot:
        set_seed(args.seed, args.deterministic)
        run = MetaRun(args, shot, splits, run_dir if len(args.shot) == 1 else run_dir / f"shot{shot}", device)
        if args.eval_weights is None:
            run.train()
            weights = run.checkpoint
        else:
            weights = resolve_path(args.eval_weights)
        results.append(run.test(weights))
    return results


def cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Entry point of the run scripts: parse and run; returns the exit code (:func:`utils.cli.run_cli`: bad input
    2 with ``error: ...`` and no traceback, GPU out of memory 3 naming --episode_batch, Ctrl-C 130)."""
    args = parser.parse_args(argv)
    try:
        run_cli(main, args, batch_flag="--episode_batch")
    except SystemExit as exit_:
        return exit_.code
    return 0
