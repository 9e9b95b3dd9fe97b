"""Prototypical-network evaluation of features, shared by pretraining validation, the ProtoNet baseline
(``run_proto.py``) and the meta stage.

An episode follows the contract of :mod:`dataloader.sampler` (shot-major, labels ``arange(way).repeat(n)``).
Prototypes are the mean support feature of each class; logits are negative squared Euclidean distances.
Two paths draw the *same* episodes from a fixed-seed generator:

* :func:`evaluate_protonet` (fast): the features of the whole split are computed once, episodes index them.
* :func:`evaluate_protonet_per_episode` (plain, the original's): every episode's images go through the
  backbone on their own. In eval mode the backbone maps each image independently of its batch, so both
  paths give the same accuracies: exactly on the CPU (tests/test_evaluate.py). On CUDA, cuDNN picks its
  convolution algorithms (TF32 by default) per batch shape, so features differ in the ~3rd digit and an
  occasional near-tie query can flip: measured on an H200, the two paths' 600 accuracies were not identical.
"""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
import torch

from dataloader.datasets import load_features, load_images
from dataloader.sampler import EpisodeSampler, split_episode
from dataloader.transforms import normalization
from models import build_backbone
from models.heads import class_prototypes
from trainer.checkpoint import load_weights
from trainer.extract import default_weights, ensure_features, extract_features
from trainer.runs import Run, chosen_run_dir, locked
from utils import mean_ci95, resolve_device, resolve_path, set_seed

# episodes scored per batched distance computation: (chunk, way*(shot+query), 640) floats stays ~100 MB
_EPISODE_CHUNK = 512


def protonet_logits(support: torch.Tensor, query: torch.Tensor, way: int) -> torch.Tensor:
    """Negative squared Euclidean distance of every query to every class prototype.

    Args:
        support: (..., way*shot, F) in shot-major order (:mod:`dataloader.sampler`); query: (..., Q, F).
    Returns:
        (..., Q, way) logits.
    """
    protos = class_prototypes(support, way, support.shape[-2] // way)                  # (..., way, F)
    # the exact difference form (not ||q||^2 - 2 q.p + ||p||^2) so ties and rounding match a plain loop
    return -((query.unsqueeze(-2) - protos.unsqueeze(-3)) ** 2).sum(dim=-1)


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., Q, way) logits and (Q,) labels -> (...,) fraction of correct argmax predictions."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=-1)


def episode_indices(targets, way: int, shot: int, query: int, episodes: int, seed: int,
                    name: str = "split") -> torch.Tensor:
    """The fixed episodes of ``seed``: (episodes, way*(shot+query)) dataset indices, shot-major.

    Both evaluation paths call this, so they score the same episodes.
    """
    sampler = EpisodeSampler(targets, way, shot, query, episodes, seed=seed, name=name)
    return sampler.sample(episodes, torch.Generator().manual_seed(seed))


def evaluate_protonet(features: torch.Tensor, targets, way: int, shot: int, query: int, episodes: int,
                      seed: int, name: str = "split") -> list[float]:
    """Accuracy of ProtoNet on ``episodes`` fixed episodes drawn from precomputed features.

    Args:
        features: (N, F) features of the split, on any device.
        targets: (N,) labels 0..C-1.
        seed: fixes the episodes (the same seed gives the same episodes in every call).
    Returns:
        one accuracy in [0, 1] per episode.
    """
    indices = episode_indices(targets, way, shot, query, episodes, seed, name).to(features.device)
    return score_episodes(features, indices, way, shot, query)


def score_episodes(features: torch.Tensor, indices: torch.Tensor, way: int, shot: int, query: int) -> list[float]:
    """ProtoNet accuracy of episodes that index rows of ``features``.

    Args:
        features: (N, F) features; indices: (E, way*(shot+query)) rows of ``features``, shot-major, on its device.
    Returns:
        one accuracy in [0, 1] per episode, in episode order.
    """
    accuracies = []
    for chunk in indices.split(_EPISODE_CHUNK):
        episode = split_episode(features[chunk].float(), way, shot, query)             # (B, n, F) each
        logits = protonet_logits(episode.support, episode.query, way)
        accuracies.append(episode_accuracy(logits, episode.query_labels))
    return torch.cat(accuracies).tolist()


def evaluate_protonet_per_episode(embed: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, targets,
                                  way: int, shot: int, query: int, episodes: int, seed: int,
                                  name: str = "split") -> list[float]:
    """The plain path: embed each episode's images separately, then score it as :func:`evaluate_protonet`.

    Args:
        embed: (n, 84, 84, 3) uint8 images -> (n, F) features (e.g. a partial of
            :func:`trainer.extract.extract_features` with the backbone in eval mode).
        images: (N, 84, 84, 3) uint8 images of the split; targets: (N,) labels.
    Returns:
        one accuracy per episode, for the same episodes as :func:`evaluate_protonet` with this seed.
    """
    accuracies = []
    for index in episode_indices(targets, way, shot, query, episodes, seed, name):
        episode = split_episode(embed(images[index.numpy()]).float(), way, shot, query)
        logits = protonet_logits(episode.support, episode.query, way)
        accuracies.append(float(episode_accuracy(logits, episode.query_labels)))
    return accuracies


def recorded_source(feature_file) -> str | None:
    """The checkpoint a feature file was extracted from, as :mod:`trainer.extract` records it (None if absent)."""
    with np.load(feature_file, allow_pickle=False) as npz:
        return str(npz["source"]) if "source" in npz.files else None


def proto_baseline(args: argparse.Namespace) -> dict:
    """``run_proto.py``: the plain-prototype baseline of a backbone on ``args.split``, per shot in ``args.shot``.

    Features come from the cache ``data/<dataset>/<model_type>/feat-<split>.npz`` (extracted from
    ``--init_weights`` first when missing) or, with ``--features fresh``, straight from ``--init_weights``
    without touching the cache. Writes ``result.json`` into the run folder and returns it.
    """
    set_seed(args.seed)
    device = resolve_device(args.device, args.threads)
    weights = resolve_path(args.init_weights or default_weights(args.dataset, args.model_type))
    if args.features == "cache":
        ensure_features(args.data_root, args.dataset, args.model_type, weights, device, args.batch_size)
        split = load_features(args.data_root, args.dataset, args.model_type, args.split)
        features, targets, source = split.features, split.targets, split.name
        weights = recorded_source(source) or weights
    else:
        backbone = build_backbone(args.model_type).to(device)
        load_weights(backbone, weights, map_location=device, kind="backbone")
        images, targets = load_images(args.data_root, args.dataset, args.split)
        mean, std = normalization(args.model_type)
        features = extract_features(backbone, images, mean, std, device, args.batch_size,
                                    desc=f"features {args.split}")
        source = str(weights)
    result = {"method": "protonet", "dataset": args.dataset, "model_type": args.model_type, "split": args.split,
              "way": args.way, "query": args.query, "episodes": args.episodes, "seed": args.seed,
              "features": source, "weights": str(weights), "shots": {}}
    for shot in args.shot:
        accuracies = evaluate_protonet(features.to(device), targets, args.way, shot, args.query, args.episodes,
                                       args.seed, name=f"{args.dataset} {args.split}")
        mean_acc, ci95 = mean_ci95(accuracies)
        result["shots"][str(shot)] = {"acc": mean_acc, "ci95": ci95}
        print(f"ProtoNet {args.dataset} {args.split} {args.way}-way {shot}-shot ({args.model_type}): "
              f"{100 * mean_acc:.2f} +- {100 * ci95:.2f} % over {args.episodes} episodes (seed {args.seed})")
    with locked(chosen_run_dir(args.run_dir, False, "proto", args.dataset, args.model_type)) as run_dir:
        path = Run(run_dir, vars(args)).save_result(result)
    print(f"result: {path}")
    return result
