"""The one episodic trainer of the meta stage, for both heads (fusion and concatenation).

On cached backbone features (F-d: 640, or 64 for Conv-4): ``max_epoch`` x ``num_batch`` training episodes
(outer loop: Adam on ``feat_learner``, cross-entropy on the query logits), ``val_episodes`` fixed validation
episodes after every epoch, the best-validation model kept as ``max_acc.pth``; then ``test_episodes`` fixed
test episodes from ``max_acc.pth``, reported as mean and 95% CI (``Test Acc 0.xxxx + 0.xxxx``). With
``--eval_weights`` only the test runs, from the given meta checkpoint. The flags and their resolution into
one :class:`trainer.meta_config.MetaConfig` live in :mod:`trainer.meta_config`.

Behaviour of the original release kept on purpose (docs/release.md), each with a flag:

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dataloader.datasets import FeatureSplit
from dataloader.sampler import EpisodeSampler, split_episode
from models.heads import TasNet
from models.inner_loop import semantic_queries
from trainer.checkpoint import load_checkpoint, load_resume_state, load_weights, save_checkpoint, strip_prefixes
from trainer.evaluate import episode_accuracy, episode_indices
from trainer.extract import load_feature_splits
from trainer.meta_config import MetaConfig
from trainer.runs import RunFolder, default_run_dir
from utils import InputError, mean_ci95, resolve_device, resolve_path, set_seed
from utils.cli import run_cli
from utils.interrupt import StopRequest
from utils.runtime import rng_state, set_rng_state

# Offsets that give the training, validation and test episodes their own streams from one --seed; the test
# episodes use --seed itself, so they are the ProtoNet baseline's (run_proto.py) for the same seed.
TRAIN_SEED_OFFSET, VAL_SEED_OFFSET = 1_000_003, 2_000_003

# Settings that --resume must find unchanged: they shape the training that last.pth continues (--max_epoch may
# grow; the test settings may change).
NOT_RESUME_KEYS = ("max_epoch", "test_query", "test_episodes", "episode_batch")


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
def evaluate(model: TasNet, split: FeatureSplit, indices: torch.Tensor, config: MetaConfig,
             query: int) -> torch.Tensor:
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
                config: MetaConfig, query: int, stop: StopRequest | None = None) -> tuple[float, float] | None:
    """One outer step per episode; returns the mean query loss and accuracy over the epoch's episodes, or None
    when ``stop`` was requested before the last episode."""
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
            if stop is not None and stop.requested and len(losses) < len(indices):
                return None
    return float(torch.stack(losses).mean()), float(torch.stack(accuracies).mean())


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
                         f"of a run_fusion.py / run_concatenation.py run, or a release meta checkpoint.")
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

    def __init__(self, config: MetaConfig, splits: dict[str, FeatureSplit], run_dir: Path, device: torch.device,
                 resume: bool = False, sources: dict | None = None, resume_dir: Path | None = None):
        """``sources``: where the inputs came from (data root, checkpoints), recorded in config.json;
        ``resume_dir``: the --run_dir that continues this run (``run_dir`` itself, or its parent for shot<K>/)."""
        self.config, self.splits, self.device, self.resume = config, splits, device, resume
        self.resume_dir = resume_dir or run_dir
        any_split = next(iter(splits.values()))
        self.feature_dim, self.semantic_dim = any_split.features.shape[1], any_split.class_vectors.shape[1]
        self.run = RunFolder(run_dir, {**config.flags(), **(sources or {}), "device": str(device),
                                       "semantic_dim": self.semantic_dim}, resume=resume)
        self.checkpoint = self.run.path / "max_acc.pth"
        self.last = self.run.path / "last.pth"
        self.label = f"[{config.head.head} {config.shot}-shot]"

    def episodes(self, split: str, query: int, count: int, seed: int) -> torch.Tensor:
        """The fixed episodes of a split for a seed: (count, way*(shot+query)) indices on the device."""
        data = self.splits[split]
        return episode_indices(data.targets.cpu(), self.config.way, self.config.shot, query, count, seed,
                               name=f"{self.config.dataset} {split}").to(self.device)

    def save(self, model: TasNet, epoch: int, val_acc: float, path: Path | None = None, **extra) -> None:
        config = self.config
        save_checkpoint(path or self.checkpoint, model.state_dict(), **extra, kind="meta", head=config.head.head,
                        semantic_dim=self.semantic_dim, feature_dim=self.feature_dim, epoch=epoch, val_acc=val_acc,
                        inner_state=config.inner_state, config=config.flags())

    def train(self) -> tuple[float, int]:
        """Train ``max_epoch`` epochs; returns the best validation accuracy and its epoch."""
        config = self.config
        model = build_model(config, self.feature_dim, self.semantic_dim, self.device)
        optimizer = torch.optim.Adam(model.feat_learner.parameters(), lr=config.vlr, weight_decay=config.weight_decay)
        sampler = EpisodeSampler(self.splits["train"].targets.cpu(), config.way, config.shot, config.train_query,
                                 config.num_batch, name=f"{config.dataset} train")
        generator = torch.Generator().manual_seed(config.seed + TRAIN_SEED_OFFSET)
        val_indices = self.episodes("val", config.val_query, config.val_episodes, config.seed + VAL_SEED_OFFSET)
        best_acc, best_epoch, first_epoch = -1.0, 0, 1
        if self.resume:
            best_acc, best_epoch, first_epoch = self.restore(model, optimizer, generator)
        with StopRequest("this episode") as stop:
            for epoch in range(first_epoch, config.max_epoch + 1):
                progress = self.train_one_epoch(epoch, model, optimizer, sampler, generator, val_indices, best_acc,
                                                best_epoch, stop)
                if progress is None:
                    # last.pth holds the previous epoch; this one is redone identically on --resume
                    done = f"epoch {epoch - 1} is the last complete one" if self.last.is_file() else "no epoch completed"
                    stop.exit_for_resume(self.resume_dir, f"stopped in epoch {epoch} ({done})")
                best_acc, best_epoch = progress
                if stop.requested:
                    stop.exit_for_resume(self.resume_dir, f"stopped after epoch {epoch}")
        return best_acc, best_epoch

    def train_one_epoch(self, epoch: int, model: TasNet, optimizer: torch.optim.Optimizer, sampler: EpisodeSampler,
                        generator: torch.Generator, val_indices: torch.Tensor, best_acc: float, best_epoch: int,
                        stop: StopRequest | None = None) -> tuple[float, int] | None:
        """Train, validate, keep the best model, log; then ``last.pth``. Returns the best accuracy and epoch, or
        None when a stop request ended the training episodes early (nothing of the epoch is saved)."""
        config = self.config
        lr = config.outer_lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        indices = sampler.sample(config.num_batch, generator).to(self.device)
        trained = train_epoch(model, optimizer, self.splits["train"], indices, config, config.train_query, stop)
        if trained is None:
            return None
        loss, acc = trained
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        val_acc, val_ci = mean_ci95(evaluate(model, self.splits["val"], val_indices, config,
                                             config.val_query).tolist())
        val_seconds = time.perf_counter() - started
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            self.save(model, epoch, val_acc)
        self.run.record({"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                         "val_ci95": val_ci, "best_val_acc": best_acc,
                         "train_episodes_per_s": config.num_batch / train_seconds,
                         "val_episodes_per_s": config.val_episodes / val_seconds})
        print(f"{self.label} epoch {epoch}/{config.max_epoch}: lr {lr:.3g} loss {loss:.4f} train acc {acc:.4f} "
              f"val acc {val_acc:.4f} + {val_ci:.4f} (best {best_acc:.4f} at epoch {best_epoch}) "
              f"{config.num_batch / train_seconds:.1f} train episodes/s", flush=True)
        # last: a kill from here on resumes after this epoch; before it, this epoch is redone identically
        self.save(model, epoch, val_acc, path=self.last, optimizer=optimizer.state_dict(),
                  generator=generator.get_state(), rng=rng_state(self.device), best_acc=best_acc,
                  best_epoch=best_epoch)
        return best_acc, best_epoch

    def restore(self, model: TasNet, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> tuple[float, int, int]:
        """``--resume``: load ``last.pth``; returns the best accuracy, its epoch and the first epoch to run."""
        if not self.last.is_file():
            print(f"note: {self.last} not found: the {self.config.shot}-shot training starts from epoch 1", flush=True)
            self.run.log.truncate_after("epoch", 0)
            return -1.0, 0, 1
        current = self.config.flags()
        ckpt = load_resume_state(model, self.last, self.device, "meta", current,
                                 [key for key in current if key not in NOT_RESUME_KEYS])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"], self.device)
        epoch = int(ckpt["epoch"])
        self.run.log.truncate_after("epoch", epoch)
        print(f"resuming {self.run.path} after epoch {epoch}", flush=True)
        return float(ckpt["best_acc"]), int(ckpt["best_epoch"]), epoch + 1

    def test(self, weights: Path) -> dict:
        """Test the meta checkpoint ``weights`` on the fixed test episodes; writes and returns result.json."""
        config = self.config
        model, ckpt = load_meta_model(weights, config, self.feature_dim, self.semantic_dim, self.device)
        if ckpt.get("release") and config.inner_state == "reset":
            print(f"note: {weights} is a release checkpoint; the release's own test accuracy comes from "
                  f"--inner_state carry (its regressor carried on from this saved state), not reset")
        elif ckpt.get("inner_state") not in (None, config.inner_state):
            print(f"note: {weights} was trained with --inner_state {ckpt['inner_state']}; testing with "
                  f"--inner_state {config.inner_state}")
        indices = self.episodes("test", config.test_query, config.test_episodes, config.seed)
        started = time.perf_counter()
        accuracies = evaluate(model, self.splits["test"], indices, config, config.test_query)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        test_acc, test_ci = mean_ci95(accuracies.tolist())
        result = {
            "test_acc": test_acc, "test_ci95": test_ci, "test_episodes": config.test_episodes,
            "val_best_acc": ckpt.get("val_acc"), "val_best_epoch": ckpt.get("epoch"),
            "dataset": config.dataset, "model_type": config.model_type, "head": config.head.head,
            "shot": config.shot, "way": config.way, "test_query": config.test_query, "setting": config.setting,
            "inner_state": config.inner_state, "trained_inner_state": ckpt.get("inner_state"),
            "metric": config.head.metric, "lamda": config.head.lamda, "normalize_input": config.normalize_input,
            "semantic_dim": self.semantic_dim, "seed": config.seed, "episodes_per_s": config.test_episodes / seconds,
            "weights": str(weights), "device": str(self.device),
        }
        self.run.save_result(result)
        print(f"Test Acc {test_acc:.4f} + {test_ci:.4f}  ({config.head.head}, {config.dataset}/{config.model_type}, "
              f"{config.way}-way {config.shot}-shot, setting {config.setting}, inner_state {config.inner_state}, "
              f"{config.test_episodes} episodes, {config.test_episodes / seconds:.1f} episodes/s)", flush=True)
        return result


def check_episode_sizes(configs: list[MetaConfig], splits: dict[str, FeatureSplit]) -> None:
    """Refuse a --way, --shot or query count that a split cannot fill, before training rather than after it."""
    for config in configs:
        queries = {"train": config.train_query, "val": config.val_query, "test": config.test_query}
        for name, split in splits.items():
            EpisodeSampler(split.targets.cpu(), config.way, config.shot, queries[name], 1,
                           name=f"{split.name} ({name} split, --{name}_query {queries[name]})")


def main(args: argparse.Namespace) -> list[dict]:
    """Train (unless ``--eval_weights``) and test every shot of ``args.shot``; returns the result dicts."""
    training = args.eval_weights is None
    configs = [MetaConfig.from_args(args, shot, training) for shot in args.shot]
    if args.resume and (args.run_dir is None or not training):
        raise InputError("--resume continues an interrupted training: pass the --run_dir of that run, and no "
                         "--eval_weights.")
    device = resolve_device(args.device, args.threads)
    if not training and not resolve_path(args.eval_weights).is_file():
        raise InputError(f"--eval_weights {args.eval_weights}: file not found.")
    if args.resume and not resolve_path(args.run_dir).is_dir():
        raise InputError(f"--resume: run folder {resolve_path(args.run_dir)} not found.")
    splits = load_feature_splits(args, ("train", "val", "test") if training else ("test",), device)
    check_episode_sizes(configs, splits)
    run_dir = resolve_path(args.run_dir) if args.run_dir else default_run_dir(args.head, args.dataset,
                                                                               args.model_type)
    results = []
    for config in configs:
        set_seed(config.seed, args.deterministic)
        folder = run_dir if len(configs) == 1 else run_dir / f"shot{config.shot}"
        sources = {key: getattr(args, key) for key in ("data_root", "init_weights", "eval_weights")}
        run = MetaRun(config, splits, folder, device, resume=args.resume, sources=sources, resume_dir=run_dir)
        if training:
            run.train()
        results.append(run.test(run.checkpoint if training else resolve_path(args.eval_weights)))
    return results


def cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Entry point of the run scripts: parse and run; returns the exit code (:func:`utils.cli.run_cli`: bad input
    2 with ``error: ...`` and no traceback, GPU out of memory 3 naming --episode_batch, a file that cannot be
    saved 4; stopped by Ctrl-C 130 or SIGTERM 143, with the --resume command printed)."""
    args = parser.parse_args(argv)
    try:
        run_cli(main, args, batch_flag="--episode_batch")
    except SystemExit as exit_:
        return exit_.code
    return 0
