"""Pretraining of the backbone: a linear classifier over all training classes, cross-entropy.

Each epoch trains on every training image once (SGD Nesterov, StepLR per epoch), then scores the backbone
with ProtoNet on fixed validation episodes drawn from the validation features, computed once per epoch.
The run folder (:mod:`trainer.runs`, whose rules for locking, saving, resuming and stopping every trainer
follows) receives ``config.json``, ``log.jsonl``, ``curves.png``, ``max_acc.pth`` (best validation accuracy),
``epoch-<N>.pth`` every 10 epochs and ``last.pth`` every epoch. Backbone checkpoints are
``{'params': backbone_state_dict, ...metadata}``: they drop into ``checkpoints/<dataset>/<model_type>.pth``.

The flags are :mod:`trainer.pre_flags`'s; the input pipelines (``--augment``) are :mod:`dataloader.pipelines`'.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloader.datasets import load_images
from dataloader.pipelines import DeviceBatches, PilBatches, epoch_batches, to_device_if_it_fits
from dataloader.sampler import check_episode_size
from dataloader.transforms import normalization
from models import build_backbone
from trainer.evaluate import evaluate_protonet
from trainer.extract import extract_features
from trainer.runs import Run, chosen_run_dir, locked, set_lr, step_lr
from utils import InputError, mean_ci95, resolve_device, set_seed
from utils.distributed import Processes, init_processes
from utils.interrupt import StopRequest
from utils.runtime import autocast, flag_on, rng_state, set_rng_state

SAVE_EVERY = 10  # epoch-<N>.pth every this many epochs, as the original
# Flags that --resume lets change: more epochs, and the speed of the same computation (the input pipeline, its
# workers, bf16, memory format, compilation, the validation batch).
RESUME_FREE = ("pre_max_epoch", "augment", "num_workers", "amp", "channels_last", "compile", "val_batch_size")


class Pretrainer:
    """One pretraining run: model, optimiser, schedule, input pipeline, validation, checkpoints.

    Args:
        args: the namespace of :func:`trainer.pre_flags.build_parser`.
        device: the resolved device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    def __init__(self, args: argparse.Namespace, device: torch.device, procs: Processes):
        self.args, self.device, self.procs = args, device, procs
        self.amp = flag_on(args.amp, device)
        self.channels_last = flag_on(args.channels_last, device)
        if args.pre_batch_size % procs.world_size:
            raise InputError(f"--pre_batch_size {args.pre_batch_size} is the global batch: it must be divisible "
                             f"by the number of processes ({procs.world_size}).")
        self.batch_size = args.pre_batch_size // procs.world_size
        self.mean, self.std = normalization(args.model_type)

        train_images, self.train_targets = load_images(args.data_root, args.dataset, "train")
        val_images, self.val_targets = load_images(args.data_root, args.dataset, "val")
        check_episode_size(self.val_targets, args.way, args.shot, args.val_query, name=f"{args.dataset} val")
        self.run = Run(args.run_dir, vars(args), args.resume, RESUME_FREE, write=procs.is_main)
        self.val_images = to_device_if_it_fits(torch.from_numpy(val_images), device)
        self.num_train = len(self.train_targets)
        num_classes = int(self.train_targets.max()) + 1
        if args.augment == "pil":
            self.batches = PilBatches(train_images, self.train_targets, self.mean, self.std, device, args.seed,
                                      args.num_workers, self.channels_last)
        else:
            self.batches = DeviceBatches(train_images, self.train_targets, self.mean, self.std, device, args.seed,
                                         args.augment == "batch", self.channels_last)

        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.backbone = build_backbone(args.model_type).to(device, memory_format=memory_format)
        self.classifier = nn.Linear(self.backbone.out_dim, num_classes).to(device)
        model: nn.Module = nn.Sequential(self.backbone, self.classifier)
        # Nesterov SGD over backbone and classifier alike, as the original's single param group
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.pre_lr, momentum=args.pre_custom_momentum,
                                         nesterov=True, weight_decay=args.pre_custom_weight_decay)
        if procs.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)  # after DDP, so that DDP's bucketing sees the compiled graph
        self.model = model

        self.epoch = 0            # completed epochs
        self.images_seen = 0      # training images of the last epoch, over every process
        self.max_acc, self.max_acc_epoch = 0.0, 0

    # ------------------------------------------------------------------ checkpoints
    def save_backbone(self, path: Path, val_acc: float, **extra) -> None:
        a = self.args
        self.run.save(path, self.backbone.state_dict(), kind="backbone", model_type=a.model_type, dataset=a.dataset,
                      epoch=self.epoch, val_acc=val_acc, max_acc=self.max_acc, max_acc_epoch=self.max_acc_epoch,
                      **extra)

    def save_last(self, val_acc: float) -> None:
        """``last.pth``: the backbone in the usual format plus everything ``--resume`` restores."""
        self.save_backbone(self.run.last, val_acc, classifier=self.classifier.state_dict(),
                           optimizer=self.optimizer.state_dict(), rng=rng_state(self.device))

    def restore(self) -> None:
        """``--resume``: continue after the last complete epoch of ``last.pth``."""
        ckpt = self.run.restore(self.backbone, "backbone", self.device)
        self.classifier.load_state_dict(ckpt["classifier"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], self.device)
        self.epoch = int(ckpt["epoch"])
        self.max_acc, self.max_acc_epoch = float(ckpt["max_acc"]), int(ckpt["max_acc_epoch"])

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, stop: StopRequest) -> tuple[float, float] | None:
        """Train on every batch of the epoch; the mean loss and accuracy over every process's images, or None when
        a stop request ended the epoch early."""
        batches = epoch_batches(self.num_train, self.batch_size, self.args.seed, epoch, self.procs,
                                self.args.max_train_batches)
        self.model.train()
        # running sums stay on the device: no host sync per step
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        images = 0
        progress = tqdm(total=len(batches), desc=f"epoch {epoch}/{self.args.pre_max_epoch}", unit="batch",
                        disable=not self.procs.is_main, dynamic_ncols=True, leave=False)
        for number, (inputs, labels) in enumerate(self.batches(batches, epoch, self.procs.rank), start=1):
            with autocast(self.device, self.amp):
                logits = self.model(inputs)
                loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum()
            images += len(labels)
            progress.update()
            if number % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}")
            if number < len(batches) and stop.requested:
                progress.close()
                return None
        progress.close()
        sums = torch.stack([loss_sum, correct, torch.tensor(float(images), device=self.device, dtype=torch.float64)])
        if self.procs.distributed:
            dist.all_reduce(sums)
        loss_total, correct_total, self.images_seen = sums.tolist()
        return loss_total / max(self.images_seen, 1), correct_total / max(self.images_seen, 1)

    def agree(self, signum: int) -> int:
        """The highest stop signal over the processes: every process must stop after the same batch, or DDP would
        wait forever for the missing ones."""
        signal = torch.tensor([float(signum)], device=self.device)
        dist.all_reduce(signal, op=dist.ReduceOp.MAX)
        return int(signal.item())

    def validate(self) -> tuple[float, float]:
        """ProtoNet accuracy (mean, 95% CI) on the fixed validation episodes, from features computed once."""
        a = self.args
        features = extract_features(self.backbone, self.val_images, self.mean, self.std, self.device,
                                    a.val_batch_size, self.channels_last, self.amp, desc="val features")
        accuracies = evaluate_protonet(features.to(self.device), self.val_targets, a.way, a.shot, a.val_query,
                                       a.val_episodes, a.val_seed, name=f"{a.dataset} val")
        return mean_ci95(accuracies)

    def end_epoch(self, epoch: int, lr: float, stats: tuple[float, float], train_seconds: float,
                  started: float) -> None:
        """Validate, log the epoch and write its checkpoints (main process only)."""
        self.epoch = epoch
        if not self.procs.is_main:
            return
        loss, acc = stats
        val_acc, val_ci95 = self.validate()
        if val_acc > self.max_acc:
            self.max_acc, self.max_acc_epoch = val_acc, epoch
            self.save_backbone(self.run.best, val_acc)
        if epoch % SAVE_EVERY == 0:
            self.save_backbone(self.run.path / f"epoch-{epoch}.pth", val_acc)
        self.save_last(val_acc)
        seconds = time.perf_counter() - started
        self.run.record({"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "val_acc": val_acc,
                         "val_ci95": val_ci95, "max_acc": self.max_acc, "time": seconds, "train_time": train_seconds,
                         "train_images_per_s": self.images_seen / max(train_seconds, 1e-9)})
        print(f"epoch {epoch}: lr {lr:.4g} loss {loss:.4f} train acc {acc:.4f} val acc {val_acc:.4f} "
              f"+- {val_ci95:.4f} (best {self.max_acc:.4f} @ {self.max_acc_epoch}) {seconds:.0f} s", flush=True)

    def fit(self) -> dict:
        """Train from ``self.epoch`` to ``--pre_max_epoch`` (stops and resumes: :mod:`trainer.runs`)."""
        a = self.args
        if a.resume:
            self.restore()
        elif self.procs.is_main:
            self.save_last(val_acc=float("nan"))
        agree = self.agree if self.procs.distributed else None
        with StopRequest("this batch", announce=self.procs.is_main, agree=agree) as stop:
            for epoch in self.run.epochs(self.epoch + 1, a.pre_max_epoch, stop):
                lr = set_lr(self.optimizer, step_lr(a.pre_lr, a.pre_gamma, a.pre_step_size, epoch))
                started = time.perf_counter()
                stats = self.train_epoch(epoch, stop)
                if stats is None:
                    self.run.drop_epoch(epoch, stop)
                self.end_epoch(epoch, lr, stats, time.perf_counter() - started, started)
        return {"run_dir": str(self.run.path), "max_acc": self.max_acc, "max_acc_epoch": self.max_acc_epoch,
                "epochs": self.epoch}


def main(args: argparse.Namespace) -> dict:
    """Pretrain, validate each epoch, write the run folder; returns the summary (``run_dir``, ``max_acc``, ...).

    Args:
        args: the flags of :mod:`trainer.pre_flags`; from code, ``utils.cli.parser_defaults(build_parser(), ...)``.
    """
    device = resolve_device(args.device, args.threads)
    procs, device = init_processes(device)
    try:
        args.run_dir = str(chosen_run_dir(args.run_dir, args.resume, "pre", args.dataset, args.model_type))
        set_seed(args.seed, args.deterministic)
        if device.type == "cuda" and not args.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed 84x84 inputs: pick the fastest conv once
        with locked(args.run_dir, args.resume) if procs.is_main else contextlib.nullcontext():
            summary = Pretrainer(args, device, procs).fit()
        if procs.is_main:
            print(f"best val acc {summary['max_acc']:.4f} at epoch {summary['max_acc_epoch']}; "
                  f"backbone: {Path(summary['run_dir']) / 'max_acc.pth'}")
        return summary
    finally:
        if procs.distributed:
            dist.destroy_process_group()
