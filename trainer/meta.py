"""The one episodic trainer of the meta stage, for both heads (fusion and concatenation).

On cached backbone features (F-d: 640, or 64 for Conv-4), every episode: the inner loop fits the semantic
regressor ``word_learner`` on the support set (:func:`fit_regressor`), the head scores the queries
(:class:`models.heads.TasNet`), and in training the outer loop takes one Adam step on ``feat_learner``
(cross-entropy on the query logits). ``max_epoch`` x ``num_batch`` training episodes, ``val_episodes`` fixed
validation episodes after every epoch, the best-validation model kept as ``max_acc.pth``; then
``test_episodes`` fixed test episodes from ``max_acc.pth`` under both protocols (:func:`test_both_protocols`),
reported as mean and 95% CI (``Test Acc 0.xxxx + 0.xxxx``). ``--eval_weights`` runs only the test;
``--lamda auto`` trains one model per lambda of ``--lamda_grid`` and tests the best on validation. The run
folder follows :mod:`trainer.runs`; the flags are :mod:`trainer.meta_config`'s. A plain, one-episode account
of the same computation is :func:`models.reference.plain_episode`.

Behaviour of the original release kept on purpose (docs/release.md), each with a flag:

- ``--inner_state carry``: the regressor is never re-initialised; its fit carries over from episode to episode
  (training and validation) and is saved in ``max_acc.pth``. ``reset`` starts every episode from the same
  saved state (independent, batched episodes). The test runs both ways whatever the flag.
- ``--normalize_input train`` (concat default): the input features are L2-normalised in the training
  episodes only, not in validation or test.
- ``--setting tran``: transductive refinement of the visual prototypes (k-means on the projected queries), in
  training, validation and test episodes alike, with no gradient through the refined prototypes.
- ``--eval_weights`` also takes the release's own meta checkpoints; their carried test continues the
  regressor the release carried, as its own evaluation does.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from dataloader.datasets import FeatureSplit
from dataloader.sampler import EpisodeSampler, check_episode_size, split_episode
from models.heads import TasNet
from models.inner_loop import fit_semantic_regressor
from trainer.checkpoint import load_checkpoint, load_weights, strip_prefixes
from trainer.evaluate import episode_accuracy, episode_indices
from trainer.extract import load_feature_splits
from trainer.flags import unused_pretraining_flags
from trainer.meta_config import MetaConfig, check_flags
from trainer.runs import Run, chosen_run_dir, locked, set_lr, step_lr
from utils import InputError, mean_ci95, resolve_device, resolve_path, set_seed
from utils.cli import run_cli
from utils.interrupt import StopRequest
from utils.runtime import rng_state, set_rng_state

# Offsets that give the training, validation and test episodes their own streams from one --seed; the test
# episodes use --seed itself, so they are the ProtoNet baseline's (run_proto.py) for the same seed.
TRAIN_SEED_OFFSET, VAL_SEED_OFFSET = 1_000_003, 2_000_003

# Flags that --resume lets change: more epochs, the test, and the batching of the episodes (results do not depend
# on it); every other flag shapes the training that last.pth continues.
RESUME_FREE = ("max_epoch", "test_query", "test_episodes", "episode_batch", "init_weights", "extract_batch_size")
# Test episodes per block of carry_block_acc: the carried protocol's accuracy climbs from block to block.
CARRY_BLOCK = 100


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


def fit_regressor(model: TasNet, batch: EpisodeBatch, config: MetaConfig) -> torch.Tensor:
    """The inner loop: fit the semantic regressor ``word_learner`` on each episode's support set (``inner_steps``
    Adam steps towards the class vectors), then map the episode's queries: (B, way*query, D) semantic queries.

    ``--inner_state reset`` fits every episode from the regressor's current state and leaves it unchanged;
    ``carry`` fits it in place, episode after episode (:mod:`models.inner_loop`)."""
    return fit_semantic_regressor(model.word_learner, batch.support, batch.support_targets, batch.query,
                                  config.inner, config.inner_state)


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
        semantic_query = fit_regressor(model, batch, config)
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
        semantic_query = fit_regressor(model, batch, config)
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
    return TasNet(feature_dim, semantic_dim, config.head_config).to(device)


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
    if ckpt.get("head", config.head) != config.head:
        script = "run_fusion.py" if ckpt["head"] == "fusion" else "run_concatenation.py"
        raise InputError(f"{path}: trained with the {ckpt['head']} head, but this run uses the {config.head} "
                         f"head; evaluate it with {script}.")
    trained_lamda = ckpt.get("config", {}).get("lamda")
    if config.head == "fusion" and trained_lamda not in (None, config.lamda):
        print(f"note: {path} was trained with --lamda {trained_lamda}; testing with --lamda {config.lamda}")
    model = build_model(config, feature_dim, semantic_dim, device)
    load_weights(model, path, map_location=device, kind="meta")
    return model, ckpt


class MetaRun:
    """Training and testing of one model (one shot, one lambda) in its run folder.

    Args:
        config: the resolved flags; splits: the feature splits on ``device``; run: the folder (:class:`Run`).
    """

    def __init__(self, config: MetaConfig, splits: dict[str, FeatureSplit], run: Run, device: torch.device):
        self.config, self.splits, self.run, self.device = config, splits, run, device
        any_split = next(iter(splits.values()))
        self.feature_dim, self.semantic_dim = any_split.features.shape[1], any_split.class_vectors.shape[1]
        lamda = f" lamda {config.lamda}" if config.head == "fusion" else ""
        self.label = f"[{config.head} {config.shot}-shot{lamda}]"

    def episodes(self, split: str, query: int, count: int, seed: int) -> torch.Tensor:
        """The fixed episodes of a split for a seed: (count, way*(shot+query)) indices on the device."""
        return episode_indices(self.splits[split].targets.cpu(), self.config.way, self.config.shot, query, count,
                               seed, name=f"{self.config.dataset} {split}").to(self.device)

    def save(self, path: Path, model: TasNet, epoch: int, val_acc: float, **extra) -> None:
        self.run.save(path, model.state_dict(), **extra, kind="meta", head=self.config.head,
                      semantic_dim=self.semantic_dim, feature_dim=self.feature_dim, epoch=epoch, val_acc=val_acc,
                      inner_state=self.config.inner_state)

    def train(self, stop: StopRequest) -> tuple[float, int]:
        """Train ``max_epoch`` epochs (or continue them); returns the best validation accuracy and its epoch."""
        config, run = self.config, self.run
        model = build_model(config, self.feature_dim, self.semantic_dim, self.device)
        optimizer = torch.optim.Adam(model.feat_learner.parameters(), lr=config.vlr, weight_decay=config.weight_decay)
        sampler = EpisodeSampler(self.splits["train"].targets.cpu(), config.way, config.shot, config.train_query,
                                 config.num_batch, name=f"{config.dataset} train")
        generator = torch.Generator().manual_seed(config.seed + TRAIN_SEED_OFFSET)
        val_indices = self.episodes("val", config.val_query, config.val_episodes, config.seed + VAL_SEED_OFFSET)
        best_acc, best_epoch, done = -1.0, 0, 0
        if run.resume:
            ckpt = run.restore(model, "meta", self.device)
            optimizer.load_state_dict(ckpt["optimizer"])
            generator.set_state(ckpt["generator"])
            set_rng_state(ckpt["rng"], self.device)
            best_acc, best_epoch, done = float(ckpt["best_acc"]), int(ckpt["best_epoch"]), int(ckpt["epoch"])

        def save_last(epoch: int, val_acc: float) -> None:
            self.save(run.last, model, epoch, val_acc, optimizer=optimizer.state_dict(),
                      generator=generator.get_state(), rng=rng_state(self.device), best_acc=best_acc,
                      best_epoch=best_epoch)

        if not run.resume:
            save_last(0, float("nan"))
        for epoch in run.epochs(done + 1, config.max_epoch, stop):
            lr = set_lr(optimizer, step_lr(config.vlr, config.gamma, config.step_size, epoch))
            started = time.perf_counter()
            indices = sampler.sample(config.num_batch, generator).to(self.device)
            trained = train_epoch(model, optimizer, self.splits["train"], indices, config, config.train_query, stop)
            if trained is None:
                run.drop_epoch(epoch, stop)
            loss, acc = trained
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            val_acc, val_ci = mean_ci95(evaluate(model, self.splits["val"], val_indices, config,
                                                 config.val_query).tolist())
            val_seconds = time.perf_counter() - started
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                self.save(run.best, model, epoch, val_acc)
            run.record({"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                        "val_ci95": val_ci, "best_val_acc": best_acc,
                        "train_episodes_per_s": config.num_batch / train_seconds,
                        "val_episodes_per_s": config.val_episodes / val_seconds})
            print(f"{self.label} epoch {epoch}/{config.max_epoch}: lr {lr:.3g} loss {loss:.4f} train acc {acc:.4f} "
                  f"val acc {val_acc:.4f} + {val_ci:.4f} (best {best_acc:.4f} at epoch {best_epoch}) "
                  f"{config.num_batch / train_seconds:.1f} train episodes/s", flush=True)
            save_last(epoch, val_acc)
        return best_acc, best_epoch

    def test(self, weights: Path, extra: dict | None = None) -> dict:
        """Test the meta checkpoint ``weights`` on the fixed test episodes under both protocols; writes and returns
        result.json (``extra``: more entries for it)."""
        config = self.config
        model, ckpt = load_meta_model(weights, config, self.feature_dim, self.semantic_dim, self.device)
        if ckpt.get("release") and config.inner_state == "reset":
            print(f"note: {weights} is a release checkpoint; the release's own test accuracy is the carried one "
                  f"(its regressor carried on from this saved state): --inner_state carry makes it this run's Test "
                  f"Acc")
        elif ckpt.get("inner_state") not in (None, config.inner_state):
            print(f"note: {weights} was trained with --inner_state {ckpt['inner_state']}; this run's protocol is "
                  f"--inner_state {config.inner_state}")
        indices = self.episodes("test", config.test_query, config.test_episodes, config.seed)
        accuracies, seconds = test_both_protocols(model, self.splits["test"], indices, config)
        figures = {state: mean_ci95(accuracies[state].tolist()) for state in accuracies}
        test_acc, test_ci = figures[config.inner_state]
        blocks = [float(block.mean()) for block in accuracies["carry"].split(CARRY_BLOCK)]
        result = {
            "test_acc": test_acc, "test_ci95": test_ci,
            "test_acc_reset": figures["reset"][0], "test_ci95_reset": figures["reset"][1],
            "test_acc_carry": figures["carry"][0], "test_ci95_carry": figures["carry"][1],
            "carry_block_acc": blocks, "test_episodes": config.test_episodes,
            "val_best_acc": ckpt.get("val_acc"), "val_best_epoch": ckpt.get("epoch"),
            "dataset": config.dataset, "model_type": config.model_type, "head": config.head,
            "shot": config.shot, "way": config.way, "test_query": config.test_query, "setting": config.setting,
            "inner_state": config.inner_state, "trained_inner_state": ckpt.get("inner_state"),
            "metric": config.metric, "lamda": config.lamda, "normalize_input": config.normalize_input,
            "semantic_dim": self.semantic_dim, "seed": config.seed,
            "episodes_per_s": {state: config.test_episodes / seconds[state] for state in seconds},
            "weights": str(weights), "device": str(self.device), **(extra or {}),
        }
        self.run.save_result(result)
        print(f"Test Acc {test_acc:.4f} + {test_ci:.4f}  ({config.head}, {config.dataset}/{config.model_type}, "
              f"{config.way}-way {config.shot}-shot, setting {config.setting}, inner_state {config.inner_state}, "
              f"{config.test_episodes} episodes)", flush=True)
        print(f"  independent episodes (reset): {figures['reset'][0]:.4f} + {figures['reset'][1]:.4f}   "
              f"carried, as the release (carry): {figures['carry'][0]:.4f} + {figures['carry'][1]:.4f}, per "
              f"{CARRY_BLOCK} episodes {' '.join(f'{b:.3f}' for b in blocks)}", flush=True)
        return result


def test_both_protocols(model: TasNet, split: FeatureSplit, indices: torch.Tensor,
                        config: MetaConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Accuracy of every test episode under both protocols, each starting from the model's saved regressor:
    ``reset`` (independent episodes) and ``carry`` (the release's: fitted in place through the episodes in order).

    Carry's 100 Adam steps per episode are sequential and tiny, so on a GPU they are bound by kernel launches and
    run faster on the CPU: there the carried protocol runs on a CPU copy of the model and the split.

    Returns:
        (E,) accuracies per protocol, and the seconds each took.
    """
    saved = {key: value.clone() for key, value in model.word_learner.state_dict().items()}
    accuracies, seconds = {}, {}
    for state in ("reset", "carry"):
        on_cpu = state == "carry" and split.features.device.type == "cuda"
        net = copy.deepcopy(model).cpu() if on_cpu else model
        net.word_learner.load_state_dict(saved)
        started = time.perf_counter()
        accuracies[state] = evaluate(net, split.to("cpu") if on_cpu else split, indices.cpu() if on_cpu else indices,
                                     replace(config, inner_state=state), config.test_query).cpu()
        seconds[state] = time.perf_counter() - started
    model.word_learner.load_state_dict(saved)
    return accuracies, seconds


def check_episode_sizes(configs: list[MetaConfig], splits: dict[str, FeatureSplit]) -> None:
    """Refuse a --way, --shot or query count that a split cannot fill, before training rather than after it."""
    for config in configs:
        queries = {"train": config.train_query, "val": config.val_query, "test": config.test_query}
        for name, split in splits.items():
            check_episode_size(split.targets.cpu(), config.way, config.shot, queries[name],
                               name=f"{split.name} ({name} split, --{name}_query {queries[name]})")


def train_and_test(args: argparse.Namespace, config: MetaConfig, splits: dict[str, FeatureSplit], folder: Path,
                   run_dir: Path, device: torch.device, stop: StopRequest, first: bool) -> dict:
    """One shot: train (one model, or one per lambda of the grid with --lamda auto, keeping the best on
    validation) and test; or, with --eval_weights, test only. ``first``: the run's first model, whose
    ``last.pth`` --resume requires (a later one without it had not started)."""
    config_json = {**config.flags(), **{key: getattr(args, key) for key in ("data_root", "init_weights",
                                                                             "eval_weights", "extract_batch_size")},
                   "device": str(device)}
    if args.eval_weights is not None:
        run = MetaRun(config, splits, Run(folder, config_json, resume_dir=run_dir), device)
        return run.test(resolve_path(args.eval_weights))
    grid = args.lamda_grid if args.lamda == "auto" else [config.lamda]
    trained = []
    for lamda in grid:
        model_dir = folder / f"lamda{lamda:g}" if args.lamda == "auto" else folder
        model_config = config.with_lamda(lamda)
        resume = args.resume and (first or (model_dir / "last.pth").is_file())
        first = False
        set_seed(config.seed, args.deterministic)
        run = MetaRun(model_config, splits, Run(model_dir, {**config_json, "lamda": lamda}, resume, RESUME_FREE,
                                                run_dir), device)
        best_acc, _ = run.train(stop)
        trained.append((best_acc, lamda, run))
        if stop.requested and lamda != grid[-1]:
            stop.exit_for_resume(run_dir, f"stopped after the lamda {lamda} model")
    best_acc, lamda, best = max(trained, key=lambda item: item[0])  # of equals, the first in the grid
    if args.lamda != "auto":
        return best.test(best.run.best)
    print(f"[{config.head} {config.shot}-shot] lamda {lamda:g} has the best validation accuracy "
          f"({best_acc:.4f}; grid {', '.join(f'{v:g}: {a:.4f}' for a, v, _ in trained)})", flush=True)
    # the shot's own folder holds the test of the chosen model, as for a single lambda
    tester = MetaRun(best.config, splits, Run(folder, {**config_json, "lamda": "auto"}, resume_dir=run_dir), device)
    return tester.test(best.run.best, {"lamda_grid": list(grid), "lamda_val_acc": [acc for acc, _, _ in trained]})


def main(args: argparse.Namespace) -> list[dict]:
    """Train (unless ``--eval_weights``) and test every shot of ``args.shot``; returns the result dicts."""
    unused_pretraining_flags(args)
    check_flags(args)
    training = args.eval_weights is None
    if args.resume and not training:
        raise InputError("--resume continues an interrupted training: pass the --run_dir of that run, and no "
                         "--eval_weights.")
    run_dir = chosen_run_dir(args.run_dir, args.resume, args.head, args.dataset, args.model_type)
    configs = [MetaConfig.from_args(args, shot) for shot in args.shot]
    device = resolve_device(args.device, args.threads)
    if not training and not resolve_path(args.eval_weights).is_file():
        raise InputError(f"--eval_weights {args.eval_weights}: file not found.")
    results = []
    with locked(run_dir, args.resume) as run_dir, StopRequest("this training step") as stop:
        splits = load_feature_splits(args, ("train", "val", "test") if training else ("test",), device)
        check_episode_sizes(configs, splits)
        for index, config in enumerate(configs):
            folder = run_dir if len(configs) == 1 else run_dir / f"shot{config.shot}"
            results.append(train_and_test(args, config, splits, folder, run_dir, device, stop, first=index == 0))
            if stop.requested and index < len(configs) - 1:
                stop.exit_for_resume(run_dir, f"stopped after the {config.shot}-shot run")
    return results


def cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Entry point of the run scripts: parse and run; returns the exit code (:func:`utils.cli.run_cli`: bad input
    2 with ``error: ...`` and no traceback, GPU out of memory 3 naming --episode_batch, a file that cannot be
    saved 4; stopped by Ctrl-C 130 or SIGTERM 143, with the --resume command printed)."""
    try:
        run_cli(main, parser.parse_args(argv), batch_flag="--episode_batch")
    except SystemExit as exit_:
        return exit_.code
    return 0
