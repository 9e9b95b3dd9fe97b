"""Episodic fine-tuning of a pretrained backbone with ProtoNet: the release's ProtoNet phase (``docs/release.md``),
run by ``python run_proto.py --finetune``.

For each shot of ``--shot`` (in ``shot<K>/`` sub-folders when there are several): ``max_epoch`` x ``num_batch``
training episodes of ``way`` classes, ``shot`` support and ``train_query`` query images per class. Adam on the
backbone's parameters (lr ``vlr``, no weight decay); the learning rate of epoch e (1-based) is
``vlr * gamma ** floor(e / step_size)``, because the release steps its StepLR at the *start* of each epoch
(:func:`trainer.runs.step_lr`). Logits are negative squared Euclidean distances of the query embeddings to the
mean support embedding of each class; cross-entropy on the queries. The support and query images of an episode
go through the backbone in one forward pass.

After every epoch, ``val_episodes`` fixed validation episodes; the best backbone is kept as ``max_acc.pth`` and
every epoch writes ``last.pth`` for ``--resume`` (the rules of :mod:`trainer.runs`).
Finally ``max_acc.pth`` is tested on the ``--episodes`` fixed episodes of ``--split`` drawn from ``--seed``: the
episodes of the ProtoNet baseline (``run_proto.py``) and of the meta stage for the same seed.

Images: training episodes get the pretraining augmentation (``dataloader.batch_augment.train_augment``),
validation and test the eval transform; then, as in the release, every image tensor is normalised per pixel
(``F.normalize(images, dim=1)``: each pixel's RGB vector to unit length) before the backbone, in training,
validation and test (:class:`PixelNormalized`). The checkpoints hold the bare backbone (kind ``backbone``,
loadable as ``--init_weights`` elsewhere) and say ``pixel_normalized: True``: the other stages feed it images
without that normalisation, as the release did.

Deviation from the release: it drew new validation episodes at random every epoch; ours are fixed (drawn from
``--seed``), so that the epochs compare on the same episodes.

Speed, same arithmetic: in eval mode the backbone maps each image independently of its batch, so validation and
test episodes are scored from the features of the images they use, each image forwarded once
(:func:`episode_accuracies`), instead of one forward pass per episode.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloader.batch_augment import train_augment
from dataloader.datasets import load_images
from dataloader.pipelines import batch_seed, to_device_if_it_fits
from dataloader.sampler import EpisodeSampler, check_episode_size, split_episode
from dataloader.transforms import normalization
from trainer.checkpoint import load_weights
from trainer.evaluate import episode_accuracy, episode_indices, protonet_logits, score_episodes
from trainer.extract import default_weights, extract_features, load_backbone
from trainer.meta import TRAIN_SEED_OFFSET, VAL_SEED_OFFSET
from trainer.runs import Run, chosen_run_dir, locked, set_lr, step_lr
from utils import InputError, mean_ci95, resolve_device, resolve_path, set_seed
from utils.interrupt import StopRequest
from utils.runtime import autocast, flag_on, rng_state, set_rng_state

METHOD = "protonet_finetune"
# Flags that --resume lets change: more epochs, the test, and the speed of the same computation (the backbone
# file is checked as the resolved "weights", not as the flag that named it).
RESUME_FREE = ("max_epoch", "init_weights", "features", "split", "query", "episodes", "batch_size", "amp",
               "channels_last")


class PixelNormalized(nn.Module):
    """The backbone behind the release's per-pixel normalisation: ``backbone(F.normalize(images, dim=1))``.

    Args:
        backbone: (B, 3, H, W) -> (B, F) module; its parameters are this module's (``backbone.`` prefix).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.out_dim = getattr(backbone, "out_dim", 640)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, F) features, each pixel's RGB vector scaled to unit length first."""
        return self.backbone(F.normalize(images, dim=1))


def episode_accuracies(net: nn.Module, images: np.ndarray, indices: torch.Tensor, way: int, shot: int, query: int,
                       mean, std, device: torch.device, batch_size: int = 256, channels_last: bool = False,
                       amp: bool = False, desc: str = "features") -> list[float]:
    """ProtoNet accuracy of fixed episodes, every image used by them forwarded once (eval mode, eval transform).

    Gives the accuracies of :func:`trainer.evaluate.evaluate_protonet` on the whole split's features for the same
    episodes, at the cost of the images the episodes use (at most ``E * way * (shot + query)``, which is far
    fewer than a large split such as tieredImageNet's).

    Args:
        net: (B, 3, 84, 84) -> (B, F) module.
        images: (N, 84, 84, 3) uint8 images of the split.
        indices: (E, way*(shot+query)) episodes of dataset indices, shot-major (``episode_indices``).
    Returns:
        one accuracy in [0, 1] per episode, in episode order.
    """
    used, position = torch.unique(indices.cpu(), return_inverse=True)
    features = extract_features(net, images[used.numpy()], mean, std, device, batch_size, channels_last, amp,
                                desc=desc).to(device)
    return score_episodes(features, position.to(device), way, shot, query)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's training episodes: a pure function of (seed, epoch), so a resumed epoch
    redraws the same episodes."""
    return torch.Generator().manual_seed((seed + TRAIN_SEED_OFFSET) * 10_007 + epoch)


class ImageSplits:
    """The three splits' images, loaded once for every shot: the training array on the device when it fits.

    train_images: (N, 84, 84, 3) uint8 tensor; val_images, test_images: numpy arrays (forwarded in batches);
    *_targets: (N,) int64 numpy arrays.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device):
        images, self.train_targets = load_images(args.data_root, args.dataset, "train")
        self.train_images = to_device_if_it_fits(torch.from_numpy(images), device)
        self.val_images, self.val_targets = load_images(args.data_root, args.dataset, "val")
        self.test_images, self.test_targets = load_images(args.data_root, args.dataset, args.split)

    def check(self, args: argparse.Namespace) -> None:
        """Refuse a --way, --shot or query count that a split cannot fill, before any training."""
        for shot in args.shot:
            for split, targets, query, flag in (("train", self.train_targets, args.train_query, "--train_query"),
                                                ("val", self.val_targets, args.val_query, "--val_query"),
                                                (args.split, self.test_targets, args.query, "--query")):
                check_episode_size(targets, args.way, shot, query,
                                   name=f"{args.dataset} {split} split ({flag} {query}, --shot {shot})")


class FinetuneRun:
    """Fine-tuning and testing of one shot setting in its run folder.

    Args:
        args: the ``run_proto.py`` namespace; shot: this run's shot; weights: the pretrained backbone.
    """

    def __init__(self, args: argparse.Namespace, shot: int, data: ImageSplits, run: Run, device: torch.device,
                 weights: Path):
        self.args, self.shot, self.data, self.run, self.device, self.weights = args, shot, data, run, device, weights
        self.amp, self.channels_last = flag_on(args.amp, device), flag_on(args.channels_last, device)
        self.mean, self.std = normalization(args.model_type)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.backbone = load_backbone(args.model_type, weights, device).to(memory_format=memory_format)
        self.net = PixelNormalized(self.backbone)
        self.optimizer = torch.optim.Adam(self.backbone.parameters(), lr=args.vlr, weight_decay=0.0)
        self.epoch = 0             # completed epochs
        self.best_acc, self.best_epoch = -1.0, 0

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, val_acc: float, **extra) -> None:
        """A backbone checkpoint (``--init_weights`` of the other scripts) with this run's metadata."""
        a = self.args
        self.run.save(path, self.backbone.state_dict(), kind="backbone", method=METHOD, pixel_normalized=True,
                      model_type=a.model_type, dataset=a.dataset, shot=self.shot, epoch=self.epoch, val_acc=val_acc,
                      max_acc=self.best_acc, max_acc_epoch=self.best_epoch, **extra)

    def save_last(self, val_acc: float) -> None:
        """``last.pth``: the backbone plus everything ``--resume`` restores."""
        self.save(self.run.last, val_acc, optimizer=self.optimizer.state_dict(), rng=rng_state(self.device))

    def restore(self) -> None:
        """``--resume``: continue after the last complete epoch of ``last.pth`` (backbone, Adam, RNG states)."""
        ckpt = self.run.restore(self.backbone, "backbone", self.device)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], self.device)
        self.epoch = int(ckpt["epoch"])
        self.best_acc, self.best_epoch = float(ckpt["max_acc"]), int(ckpt["max_acc_epoch"])

    # ------------------------------------------------------------------ training
    def train(self, stop: StopRequest) -> tuple[float, int]:
        """Fine-tune from ``self.epoch`` to ``--max_epoch``; returns the best validation accuracy and its epoch."""
        a = self.args
        sampler = EpisodeSampler(self.data.train_targets, a.way, self.shot, a.train_query, a.num_batch,
                                 name=f"{a.dataset} train")
        val_indices = episode_indices(self.data.val_targets, a.way, self.shot, a.val_query, a.val_episodes,
                                      a.seed + VAL_SEED_OFFSET, name=f"{a.dataset} val")
        if self.run.resume:
            self.restore()
        else:
            self.save_last(val_acc=float("nan"))
        for epoch in self.run.epochs(self.epoch + 1, a.max_epoch, stop):
            lr = set_lr(self.optimizer, step_lr(a.vlr, a.gamma, a.step_size, epoch))
            started = time.perf_counter()
            sums = self.train_epoch(epoch, sampler, stop)
            if sums is None:
                self.run.drop_epoch(epoch, stop)
            self.end_epoch(epoch, lr, sums, time.perf_counter() - started, val_indices)
        return self.best_acc, self.best_epoch

    def train_epoch(self, epoch: int, sampler: EpisodeSampler, stop: StopRequest) -> tuple[float, float] | None:
        """Train on the epoch's episodes; the mean loss and accuracy, or None when a stop request ended it early."""
        a, device = self.args, self.device
        indices = sampler.sample(a.num_batch, epoch_generator(a.seed, epoch))
        self.net.train()
        # running sums stay on the device: no host sync per episode
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        acc_sum = torch.zeros((), device=device, dtype=torch.float64)
        images = self.data.train_images
        for number in range(a.num_batch):
            batch = images.index_select(0, indices[number].to(images.device)).to(device, non_blocking=True)
            # each episode's augmentation seed is a function of its position, so a redone epoch redraws it
            generator = torch.Generator(device).manual_seed(batch_seed(a.seed, epoch, number, 0))
            inputs = train_augment(batch, self.mean, self.std, generator, channels_last=self.channels_last)
            with autocast(device, self.amp):
                embeddings = self.net(inputs)
            episode = split_episode(embeddings.float(), a.way, self.shot, a.train_query)
            logits = protonet_logits(episode.support, episode.query, a.way)
            loss = F.cross_entropy(logits, episode.query_labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
            acc_sum += episode_accuracy(logits.detach(), episode.query_labels)
            if number + 1 < a.num_batch and stop.requested:
                return None
        return float(loss_sum) / a.num_batch, float(acc_sum) / a.num_batch

    def validate(self, val_indices: torch.Tensor) -> tuple[float, float]:
        """ProtoNet accuracy (mean, 95% CI) of the backbone on the fixed validation episodes."""
        a = self.args
        accuracies = episode_accuracies(self.net, self.data.val_images, val_indices, a.way, self.shot, a.val_query,
                                        self.mean, self.std, self.device, a.batch_size, self.channels_last,
                                        self.amp, desc="val features")
        return mean_ci95(accuracies)

    def end_epoch(self, epoch: int, lr: float, stats: tuple[float, float], train_seconds: float,
                  val_indices: torch.Tensor) -> None:
        """Validate, keep the best backbone, log the epoch; then ``last.pth``."""
        a = self.args
        (loss, acc), self.epoch = stats, epoch
        started = time.perf_counter()
        val_acc, val_ci = self.validate(val_indices)
        val_seconds = time.perf_counter() - started
        if val_acc > self.best_acc:
            self.best_acc, self.best_epoch = val_acc, epoch
            self.save(self.run.best, val_acc)
        self.run.record({"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                         "val_ci95": val_ci, "best_val_acc": self.best_acc,
                         "train_episodes_per_s": a.num_batch / max(train_seconds, 1e-9),
                         "val_episodes_per_s": a.val_episodes / max(val_seconds, 1e-9)})
        print(f"[protonet {self.shot}-shot] epoch {epoch}/{a.max_epoch}: lr {lr:.3g} loss {loss:.4f} train acc "
              f"{acc:.4f} val acc {val_acc:.4f} + {val_ci:.4f} (best {self.best_acc:.4f} at epoch {self.best_epoch}) "
              f"{a.num_batch / max(train_seconds, 1e-9):.1f} train episodes/s", flush=True)
        self.save_last(val_acc)

    # ------------------------------------------------------------------ test
    def test(self, weights: Path) -> dict:
        """Test the backbone ``weights`` on the fixed episodes of ``--split``; writes and returns result.json."""
        a = self.args
        ckpt = load_weights(self.backbone, weights, map_location=self.device, kind="backbone")
        indices = episode_indices(self.data.test_targets, a.way, self.shot, a.query, a.episodes, a.seed,
                                  name=f"{a.dataset} {a.split}")
        started = time.perf_counter()
        accuracies = episode_accuracies(self.net, self.data.test_images, indices, a.way, self.shot, a.query,
                                        self.mean, self.std, self.device, a.batch_size, self.channels_last,
                                        self.amp, desc=f"{a.split} features")
        seconds = time.perf_counter() - started
        test_acc, test_ci = mean_ci95(accuracies)
        result = {
            "method": METHOD, "test_acc": test_acc, "test_ci95": test_ci, "test_episodes": a.episodes,
            "val_best_acc": ckpt.get("val_acc"), "val_best_epoch": ckpt.get("epoch"),
            "dataset": a.dataset, "model_type": a.model_type, "split": a.split, "shot": self.shot, "way": a.way,
            "test_query": a.query, "seed": a.seed, "max_epoch": a.max_epoch, "num_batch": a.num_batch,
            "vlr": a.vlr, "episodes_per_s": a.episodes / max(seconds, 1e-9), "weights": str(weights),
            "init_weights": str(self.weights), "device": str(self.device),
        }
        self.run.save_result(result)
        print(f"Test Acc {test_acc:.4f} + {test_ci:.4f}  (ProtoNet fine-tuned, {a.dataset}/{a.model_type}, "
              f"{a.way}-way {self.shot}-shot, {a.episodes} episodes of {a.split}, seed {a.seed})", flush=True)
        return result


def main(args: argparse.Namespace) -> list[dict]:
    """``run_proto.py --finetune``: fine-tune and test every shot of ``args.shot``; returns the result dicts."""
    if len(set(args.shot)) != len(args.shot):
        raise InputError(f"--shot lists a value twice: {args.shot}.")
    run_dir = chosen_run_dir(args.run_dir, args.resume, "proto_finetune", args.dataset, args.model_type)
    device = resolve_device(args.device, args.threads)
    weights = resolve_path(args.init_weights) if args.init_weights else default_weights(args.dataset, args.model_type)
    if not weights.is_file():
        raise InputError(f"--init_weights {weights}: file not found. Fine-tuning starts from a pretrained backbone: "
                         f"pretrain one with python run_pre.py --dataset {args.dataset} --model_type "
                         f"{args.model_type} and pass its max_acc.pth (or copy it to "
                         f"{default_weights(args.dataset, args.model_type)}).")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 84x84 inputs and episode sizes: pick the fastest conv once
    results = []
    with locked(run_dir, args.resume) as run_dir, StopRequest("this episode") as stop:
        data = ImageSplits(args, device)
        data.check(args)
        for index, shot in enumerate(args.shot):
            folder = run_dir if len(args.shot) == 1 else run_dir / f"shot{shot}"
            config = {**vars(args), "shot": shot, "method": METHOD, "weights": str(weights), "device": str(device)}
            resume = args.resume and (index == 0 or (folder / "last.pth").is_file())
            set_seed(args.seed)
            run = FinetuneRun(args, shot, data, Run(folder, config, resume, RESUME_FREE, run_dir), device, weights)
            run.train(stop)
            results.append(run.test(run.run.best))
            if stop.requested and index < len(args.shot) - 1:
                stop.exit_for_resume(run_dir, f"stopped after the {shot}-shot run")
    return results
