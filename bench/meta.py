"""Meta-stage speed: episodes/s of the trainer's episodes against a plain per-episode reference.

    python bench/meta.py --device cpu --threads 1            # CPU-sized (100 test episodes per setting), ~2 min
    python bench/meta.py --device cpu --threads 2 --parts inner   # the inner loop alone, reset, on both cores
    python bench/meta.py --device cuda                       # 600 test episodes per setting

On synthetic class-structured features (64 / 16 / 20 classes x 600 samples x 640-d, class vectors of
``--dim``), for each head, shot and inner-loop mode, it times ``trainer.meta.train_epoch`` and
``trainer.meta.evaluate`` on training, validation and test episodes against the original's way, one episode
at a time (``models.reference.plain_episode``: 100 Adam steps of the regressor, then the head; plus the outer
Adam step in training). The reference carries its regressor over, so in carry mode both give the same
accuracies. Every measurement follows a warm-up on other episodes.

``inner`` times the inner loop alone on the test episodes: reset mode's ``fit_semantic_regressor`` over all of
them against ``plain_fit_regressor`` on each of the first ``--ref_episodes``, from the same initial state.
``--threads`` applies to ours and, unless ``--ref_threads`` is given, to the reference.

Prints one JSON line: ``rows`` (per implementation, setting and phase: episodes, seconds, episodes/s, accuracy,
peak memory), ``ratios`` (ours / reference episodes/s) and ``test_600_s`` (a 600-episode test's wall time,
extrapolated unless ``--episodes`` is 600).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: put the repository root on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from bench import bench_parser, emit, fill_unset, machine, peak_memory, setup, timed
from dataloader.datasets import FeatureSplit
from dataloader.sampler import EpisodeSampler, episode_labels
from models.heads import TasNet
from models.inner_loop import INNER_STATES, fit_semantic_regressor, plain_fit_regressor
from models.reference import plain_episode
from trainer.evaluate import episode_indices
from trainer.meta import build_model, evaluate, gather_episodes, train_epoch
from trainer.flags import positive_int
from trainer.flags import non_negative_int
from trainer.meta_config import MetaConfig, build_parser
from utils.cli import parser_defaults

FEATURE_DIM = 640
WAY, QUERY = 5, 15  # the run scripts' episodes: 5-way, 15 queries per class in every phase
PHASES = ("train", "val", "test")


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    add = parser.add_argument
    add("--dim", type=int, default=300, help="class-vector size D (300: GloVe 840B; 50: the shared GloVe 6B file)")
    add("--classes", type=int, nargs=3, default=[64, 16, 20], metavar=("TRAIN", "VAL", "TEST"),
        help="classes of the synthetic train, val and test splits (miniImageNet's)")
    add("--samples_per_class", type=int, default=600, help="synthetic samples per class")
    add("--heads", nargs="+", default=["fusion", "concat"], choices=["fusion", "concat"], help="heads to time")
    add("--shots", type=int, nargs="+", default=[1, 5], help="shots to time (5-way, 15 queries)")
    add("--modes", nargs="+", default=list(INNER_STATES), choices=INNER_STATES, help="inner-loop modes to time")
    add("--episodes", type=int, default=0, help="test episodes (0: the standard 600 on CUDA, 100 on a CPU)")
    add("--train_episodes", type=int, default=0, help="training episodes (0: 100, an epoch, on CUDA; 40 on a CPU)")
    add("--val_episodes", type=int, default=0, help="validation episodes (0: 100 on CUDA, 40 on a CPU)")
    add("--carry_episodes", type=int, default=-1,
        help="cap on the episodes of every carry-mode phase, which is sequential (0: no cap; -1: none on CUDA, "
             "30 on a CPU)")
    add("--ref_episodes", type=int, default=0,
        help="episodes of the plain reference per phase (0: 60 on CUDA, 10 on a CPU, where it runs ~3-12 ep/s)")
    add("--warmup", type=int, default=0, help="untimed episodes before each measurement (0: 4 on CUDA, 2 on a CPU)")
    add("--parts", nargs="+", default=["inner", "settings"], choices=["inner", "settings"],
        help="inner: the inner loop alone (reset against plain_fit_regressor); settings: the trainer's episodes "
             "per head, shot and mode against the plain reference")
    add("--ref_threads", type=int, default=0,
        help="torch threads while the plain reference runs (0: the same as --threads)")
    add("--episode_batch", type=positive_int, default=100, help="the trainer's --episode_batch (reset mode)")
    add("--inner_steps", type=non_negative_int, default=100,
        help="inner-loop Adam steps per episode, ours and the reference's (100: the original)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.classes, args.samples_per_class, args.inner_steps = 16, [6, 5, 5], 20, 10
        args.shots, args.episodes, args.train_episodes, args.val_episodes = [1], 3, 3, 3
        args.carry_episodes, args.ref_episodes, args.warmup, args.episode_batch = 2, 2, 1, 2
    return args


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the 0 / -1 defaults for the device: the run scripts' sizes on CUDA, minutes-sized ones on a CPU."""
    cuda = device.type == "cuda"
    fill_unset(args, {"episodes": 600 if cuda else 100, "train_episodes": 100 if cuda else 40,
                      "val_episodes": 100 if cuda else 40, "ref_episodes": 60 if cuda else 10,
                      "warmup": 4 if cuda else 2})
    if args.carry_episodes < 0:
        args.carry_episodes = 0 if cuda else 30
    return args


def synthetic_splits(args: argparse.Namespace, device: torch.device) -> dict[str, FeatureSplit]:
    """Class-structured features: non-negative (like pooled LeakyReLU features) class centres plus noise, and
    class vectors that are a fixed random linear image of the centres, so a regressor has something to learn."""
    generator = torch.Generator().manual_seed(args.seed)
    mixing = torch.randn(FEATURE_DIM, args.dim, generator=generator) / FEATURE_DIM ** 0.5
    splits = {}
    for name, num_classes in zip(PHASES, args.classes):
        centres = torch.rand(num_classes, FEATURE_DIM, generator=generator) * 2
        targets = torch.arange(num_classes).repeat_interleave(args.samples_per_class)
        noise = torch.randn(len(targets), FEATURE_DIM, generator=generator)
        features = (centres[targets] + 0.7 * noise).clamp_min(0)
        vectors = centres @ mixing + 0.1 * torch.randn(num_classes, args.dim, generator=generator)
        splits[name] = FeatureSplit(features, targets, vectors, name=f"synthetic {name}").to(device)
    return splits


def plain_run(model: TasNet, split: FeatureSplit, indices: torch.Tensor, config: MetaConfig, query: int,
              training: bool, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """The reference (:func:`models.reference.plain_episode`) over episodes (E, way*(shot+query)), one after the
    other, with the outer Adam step in training -> (E,) accuracies."""
    accuracies = []
    for index in indices:
        data = split.features[index]
        if config.normalize(training):
            data = F.normalize(data, dim=-1)
        support, queries = data[:config.way * config.shot], data[config.way * config.shot:]
        semantic_protos = split.class_vectors[split.targets[index[:config.way]]]
        with torch.set_grad_enabled(training):
            logits = plain_episode(model.feat_learner, model.word_learner, support, queries, semantic_protos,
                                   config.shot, config.head_config, config.inner)
        labels = episode_labels(config.way, query, data.device)
        if training:
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracies.append((logits.argmax(1) == labels).float().mean().detach())
    return torch.stack(accuracies)


def meta_config(head: str, shot: int, mode: str, args: argparse.Namespace) -> tuple[argparse.Namespace, MetaConfig]:
    """The run scripts' flags for this setting (dataset ``mini``: euclidean metric, inner StepLR(10, 0.2))."""
    args = parser_defaults(build_parser(), head=head, inner_state=mode, episode_batch=args.episode_batch,
                           inner_steps=args.inner_steps, dataset="mini", way=WAY, train_query=QUERY,
                           val_query=QUERY, test_query=QUERY)
    return args, MetaConfig.from_args(args, shot)


def outer_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.feat_learner.parameters(), lr=args.vlr, weight_decay=args.weight_decay)


def initial_model(config: MetaConfig, splits: dict[str, FeatureSplit], args: argparse.Namespace,
                  device: torch.device) -> nn.Module:
    """The trainer's model for this setting, initialised from --seed (the same weights for ours and reference)."""
    torch.manual_seed(args.seed)
    return build_model(config, FEATURE_DIM, splits["train"].class_vectors.shape[1], device)


def warm_then_time(make_run: Callable[[torch.Tensor], Callable[[], torch.Tensor]], warmup: torch.Tensor,
                   chosen: torch.Tensor, device: torch.device) -> dict:
    """Run ``make_run(warmup)()`` untimed, then time ``make_run(chosen)()``, which returns the accuracies of the
    episodes ``chosen`` (E, way*(shot+query)). ``make_run`` builds a fresh model each time."""
    make_run(warmup)()
    run = make_run(chosen)
    with peak_memory(device) as memory:
        seconds, accuracies = timed(run, device)
    return {"episodes": chosen.shape[0], "seconds": seconds, "episodes_per_s": chosen.shape[0] / seconds,
            "acc": float(accuracies.float().mean()), **memory}


def bench_setting(head: str, shot: int, mode: str, splits: dict[str, FeatureSplit], indices: dict,
                  args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Ours (``trainer.meta.train_epoch`` / ``evaluate``) on the three phases of one setting."""
    run_args, config = meta_config(head, shot, mode, args)
    initial = initial_model(config, splits, args, device)
    rows = []
    for phase in PHASES:
        # the last --warmup episodes of each draw are the warm-up ones, never timed
        count = indices[phase].shape[0] - args.warmup
        if mode == "carry" and args.carry_episodes:
            count = min(count, args.carry_episodes)

        def make_run(chosen, phase=phase):
            model = copy.deepcopy(initial)
            if phase == "train":
                optimizer = outer_optimizer(model, run_args)
                return lambda: torch.tensor(train_epoch(model, optimizer, splits[phase], chosen, config, QUERY)[1])
            return lambda: evaluate(model, splits[phase], chosen, config, QUERY)

        result = warm_then_time(make_run, indices[phase][-args.warmup:], indices[phase][:count], device)
        rows.append({"impl": "ours", "head": head, "shot": shot, "mode": mode, "phase": phase, **result})
    return rows


@contextmanager
def reference_threads(args: argparse.Namespace):
    """Run the block with torch at ``--ref_threads`` threads (when given), then restore the count."""
    threads = torch.get_num_threads()
    if args.ref_threads:
        torch.set_num_threads(args.ref_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_inner(shot: int, splits: dict[str, FeatureSplit], indices: dict, args: argparse.Namespace,
                device: torch.device) -> list[dict]:
    """The inner loop alone on the test episodes: reset-mode ``fit_semantic_regressor`` against ``plain_fit_regressor``
    per episode from the same initial state (then the query map), one episode after another."""
    _, config = meta_config("fusion", shot, "reset", args)
    regressor = initial_model(config, splits, args, device).word_learner

    def ours(chosen):
        episodes = gather_episodes(splits["test"], chosen, config, QUERY, training=False)
        return lambda: fit_semantic_regressor(regressor, episodes.support, episodes.support_targets, episodes.query,
                                              config.inner, "reset")

    def plain(chosen):
        episodes = gather_episodes(splits["test"], chosen, config, QUERY, training=False)

        def run():
            outputs = []
            for b in range(chosen.shape[0]):
                fitted = copy.deepcopy(regressor)
                plain_fit_regressor(fitted, episodes.support[b], episodes.support_targets[b], config.inner)
                with torch.no_grad():
                    outputs.append(fitted(episodes.query[b]))
            return torch.stack(outputs)
        return run

    rows = []
    warmup, test = indices["test"][-args.warmup:], indices["test"][:-args.warmup]
    for impl, make_run, chosen in (("ours", ours, test), ("reference", plain, test[:args.ref_episodes])):
        with reference_threads(args) if impl == "reference" else nullcontext():
            make_run(warmup)()
            seconds, _ = timed(make_run(chosen), device)
            rows.append({"impl": impl, "shot": shot, "mode": "reset", "episodes": chosen.shape[0],
                         "seconds": seconds, "episodes_per_s": chosen.shape[0] / seconds,
                         "threads": torch.get_num_threads()})
    rows[0]["ratio"] = rows[0]["episodes_per_s"] / rows[1]["episodes_per_s"]
    return rows


def bench_reference(head: str, shot: int, splits: dict[str, FeatureSplit], indices: dict,
                    args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The plain reference on the first ``--ref_episodes`` training and test episodes of the setting."""
    run_args, config = meta_config(head, shot, "carry", args)
    # the same initial weights as ours, so carry-mode accuracies agree
    initial = initial_model(config, splits, args, device)
    rows = []
    for phase, split in (("train", "train"), ("eval", "test")):
        count = min(args.ref_episodes, indices[split].shape[0] - args.warmup)
        training = phase == "train"

        def make_run(chosen, split=split, training=training):
            model = copy.deepcopy(initial)
            optimizer = outer_optimizer(model, run_args) if training else None
            return lambda: plain_run(model, splits[split], chosen, config, QUERY, training, optimizer)

        with reference_threads(args):
            result = warm_then_time(make_run, indices[split][-args.warmup:], indices[split][:count], device)
        rows.append({"impl": "reference", "head": head, "shot": shot, "mode": "carry", "phase": phase, **result})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Ours / reference episodes/s per setting and phase (val and test against the reference's eval rate)."""
    reference = {(r["head"], r["shot"], r["phase"]): r["episodes_per_s"] for r in rows if r["impl"] == "reference"}
    out = []
    for row in rows:
        if row["impl"] != "ours":
            continue
        ref = reference.get((row["head"], row["shot"], "train" if row["phase"] == "train" else "eval"))
        if ref:
            out.append({key: row[key] for key in ("head", "shot", "mode", "phase")} |
                       {"ours_per_s": row["episodes_per_s"], "reference_per_s": ref,
                        "ratio": row["episodes_per_s"] / ref})
    return out


def ratio_range(rows: list[dict]) -> dict:
    """Per inner-loop mode, the lowest and highest test-phase ratio over the settings: what the targets read."""
    by_mode: dict[str, list[float]] = {}
    for ratio in ratios(rows):
        if ratio["phase"] == "test":
            by_mode.setdefault(ratio["mode"], []).append(ratio["ratio"])
    return {mode: [min(values), max(values)] for mode, values in by_mode.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = setup(args)
    args = resolve_sizes(args, device)
    started = machine(device)  # before the work: the load average it ran under
    splits = synthetic_splits(args, device)
    counts = {"train": args.train_episodes, "val": args.val_episodes, "test": args.episodes}
    rows, inner = [], []
    for shot in args.shots:
        # the trainer's own episode draws: fixed seeded episodes for val/test, a sampler for training
        indices = {phase: episode_indices(splits[phase].targets.cpu(), WAY, shot, QUERY,
                                          counts[phase] + args.warmup, args.seed + i, name=phase).to(device)
                   for i, phase in enumerate(("val", "test"), start=1)}
        sampler = EpisodeSampler(splits["train"].targets.cpu(), WAY, shot, QUERY, counts["train"] + args.warmup)
        indices["train"] = sampler.sample(counts["train"] + args.warmup,
                                          torch.Generator().manual_seed(args.seed)).to(device)
        if "inner" in args.parts:
            inner += bench_inner(shot, splits, indices, args, device)
        for head in args.heads if "settings" in args.parts else []:
            rows += bench_reference(head, shot, splits, indices, args, device)
            for mode in args.modes:
                rows += bench_setting(head, shot, mode, splits, indices, args, device)
    test_600 = {f"{r['head']}/{r['shot']}-shot/{r['mode']}": {"seconds": 600 / r["episodes_per_s"],
                                                               "measured": r["episodes"] == 600}
                for r in rows if r["impl"] == "ours" and r["phase"] == "test"}
    record = {"bench": "meta", **started,
              "config": {key: getattr(args, key) for key in ("dim", "classes", "samples_per_class", "episodes",
                                                             "train_episodes", "val_episodes", "carry_episodes",
                                                             "ref_episodes", "warmup", "episode_batch", "inner_steps",
                                                             "threads", "ref_threads", "quick")},
              "inner": inner, "rows": rows, "ratios": ratios(rows), "test_ratio_range": ratio_range(rows),
              "test_600_s": test_600, "load_avg_end": list(os.getloadavg())}
    emit(record)
    return record


if __name__ == "__main__":
    main()
