"""Pretraining of the backbone: a linear classifier over all training classes, cross-entropy.

Each epoch trains on every training image once (SGD Nesterov, StepLR per epoch), then scores the backbone
with ProtoNet on fixed validation episodes drawn from the validation features, computed once per epoch.
The run folder (``trainer.runs.RunFolder``) receives ``config.json``, ``log.jsonl``, ``curves.png``,
``max_acc.pth`` (best validation accuracy), ``epoch-<N>.pth`` every 10 epochs and ``last.pth`` every epoch.
Backbone checkpoints are ``{'params': backbone_state_dict, ...metadata}``: they drop into
``checkpoints/<dataset>/<model_type>.pth``. ``last.pth`` also holds what ``--resume`` needs; Ctrl-C or SIGTERM
(:mod:`utils.interrupt`) stops the run after the current batch with a ``last.pth`` of that position.

The flags are :mod:`trainer.pre_flags`'s; the input pipelines (``--augment``) are :mod:`dataloader.pipelines`'.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloader.datasets import load_images
from dataloader.pipelines import DeviceBatches, PilBatches, epoch_batches, to_device_if_it_fits
from dataloader.sampler import EpisodeSampler
from dataloader.transforms import normalization
from models import build_backbone
from trainer.checkpoint import load_resume_state, save_checkpoint
from trainer.evaluate import evaluate_protonet
from trainer.extract import extract_features
from trainer.runs import RunFolder, default_run_dir
from utils import InputError, mean_ci95, resolve_device, resolve_path, set_seed
from utils.distributed import Processes, init_processes
from utils.interrupt import StopRequest
from utils.runtime import autocast, flag_on, rng_state, set_rng_state

SAVE_EVERY = 10  # epoch-<N>.pth every this many epochs, as the original
# Flags that --resume must find unchanged: they shape the training that last.pth continues (--pre_max_epoch may
# grow; speed flags such as --augment pil/batch, --amp or --num_workers may change).
RESUME_KEYS = ("dataset", "model_type", "pre_batch_size", "pre_lr", "pre_gamma", "pre_step_size",
               "pre_custom_momentum", "pre_custom_weight_decay", "seed", "way", "shot", "val_query", "val_episodes",
               "val_seed", "max_train_batches")


def pretrain_lr(epoch: int, lr: float, gamma: float, step_size: int) -> float:
    """Learning rate of 1-based ``epoch``: ``lr * gamma ** floor(epoch / step_size)``.

    The original calls ``StepLR.step()`` at the *start* of every epoch (PyTorch >= 1.1 semantics), so epoch 1
    already counts as one step: epochs 1-29 train at lr, 30-59 at lr * gamma, ... We reproduce that.
    """
    return lr * gamma ** (epoch // step_size)


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
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=args.pre_step_size,
                                                         gamma=args.pre_gamma)
        if procs.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)  # after DDP, so that DDP's bucketing sees the compiled graph
        self.model = model

        self.epoch = 0            # completed epochs
        self.batch = 0            # batches done in the epoch under way (non-zero only in an interrupted run)
        self.sums = [0.0, 0.0, 0]  # loss sum, correct predictions, images of the epoch under way
        self.max_acc, self.max_acc_epoch = 0.0, 0
        self.run: RunFolder | None = None
        self.run_dir = resolve_path(args.run_dir)

    # ------------------------------------------------------------------ checkpoints
    def save_backbone(self, path: Path, val_acc: float, **extra) -> None:
        a = self.args
        save_checkpoint(path, self.backbone.state_dict(), kind="backbone", model_type=a.model_type,
                        dataset=a.dataset, epoch=self.epoch, config=vars(a), val_acc=val_acc,
                        max_acc=self.max_acc, max_acc_epoch=self.max_acc_epoch, **extra)

    def save_last(self, val_acc: float) -> None:
        """``last.pth``: the backbone in the usual format plus everything ``--resume`` restores."""
        self.save_backbone(self.run_dir / "last.pth", val_acc, batch=self.batch, epoch_sums=list(self.sums),
                           classifier=self.classifier.state_dict(), optimizer=self.optimizer.state_dict(),
                           scheduler=self.scheduler.state_dict(), rng=rng_state(self.device))

    def resume(self) -> None:
        """Continue from ``<run_dir>/last.pth`` (model, optimiser, scheduler, position, RNG states)."""
        path = self.run_dir / "last.pth"
        if not path.is_file():
            raise InputError(f"--resume: {path} not found; pass the --run_dir of the run to continue (a run "
                             f"killed in its first epoch has none: start it again without --resume).")
        ckpt = load_resume_state(self.backbone, path, self.device, "backbone", vars(self.args), RESUME_KEYS)
        self.classifier.load_state_dict(ckpt["classifier"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], self.device)
        self.epoch, self.batch = int(ckpt["epoch"]), int(ckpt["batch"])
        self.sums = list(ckpt["epoch_sums"])
        self.max_acc, self.max_acc_epoch = float(ckpt["max_acc"]), int(ckpt["max_acc_epoch"])

    # ------------------------------------------------------------------ epochs
    def begin_epoch(self) -> float:
        """Step the scheduler at the start of the epoch, as the original (see :func:`pretrain_lr`)."""
        if self.batch == 0:  # an interrupted epoch already stepped it
            with warnings.catch_warnings():
                # PyTorch warns when the scheduler steps before the optimizer: that order is the recipe
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, epoch: int, stop: StopRequest) -> bool:
        """Train until the end of the epoch (from ``self.batch``) or a stop request; True when complete."""
        batches = epoch_batches(self.num_train, self.batch_size, self.args.seed, epoch, self.procs,
                                self.args.max_train_batches)
        self.model.train()
        loss_sum = torch.tensor(self.sums[0], device=self.device, dtype=torch.float64)
        correct = torch.tensor(self.sums[1], device=self.device, dtype=torch.float64)
        progress = tqdm(total=len(batches), initial=self.batch, desc=f"epoch {epoch}/{self.args.pre_max_epoch}",
                        unit="batch", disable=not self.procs.is_main, dynamic_ncols=True, leave=False)
        complete = True
        for inputs, labels in self.batches(batches, epoch, self.batch, self.procs.rank):
            with autocast(self.device, self.amp):
                logits = self.model(inputs)
                loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # running sums stay on the device: no host sync per step
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum()
            self.sums[2] += len(labels)
            self.batch += 1
            progress.update()
            if self.batch % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}")
            if self.stop_requested(stop) and self.batch < len(batches):
                complete = False
                break
        progress.close()
        self.sums[:2] = [float(loss_sum), float(correct)]
        return complete

    def stop_requested(self, stop: StopRequest) -> bool:
        """Whether any process was asked to stop; each then records the signal (the highest if several)."""
        if not self.procs.distributed:
            return stop.requested
        # every process must stop after the same batch, or DDP would wait forever for the missing ones
        signum = torch.tensor([float(stop.signal or 0)], device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item():
            stop.request(int(signum.item()))
        return stop.requested

    def epoch_stats(self) -> tuple[float, float]:
        """Mean loss and accuracy of the epoch over every process's images."""
        sums = torch.tensor(self.sums, dtype=torch.float64, device=self.device)
        if self.procs.distributed:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        return loss_sum / max(count, 1), correct / max(count, 1)

    def validate(self) -> tuple[float, float]:
        """ProtoNet accuracy (mean, 95% CI) on the fixed validation episodes, from features computed once."""
        a = self.args
        features = extract_features(self.backbone, self.val_images, self.mean, self.std, self.device,
                                    a.val_batch_size, self.channels_last, self.amp, desc="val features")
        accuracies = evaluate_protonet(features.to(self.device), self.val_targets, a.way, a.shot, a.val_query,
                                       a.val_episodes, a.val_seed, name=f"{a.dataset} val")
        return mean_ci95(accuracies)

    def end_epoch(self, epoch: int, lr: float, train_seconds: float, started: float) -> dict:
        """Validate, log the epoch and write its checkpoints (main process only)."""
        loss, acc = self.epoch_stats()
        images, self.sums = self.sums[2], [0.0, 0.0, 0]  # last.pth must not carry them into the next epoch
        record = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc}
        if self.procs.is_main:
            val_acc, val_ci95 = self.validate()
            if val_acc > self.max_acc:
                self.max_acc, self.max_acc_epoch = val_acc, epoch
                self.save_backbone(self.run_dir / "max_acc.pth", val_acc)
            if epoch % SAVE_EVERY == 0:
                self.save_backbone(self.run_dir / f"epoch-{epoch}.pth", val_acc)
            self.save_last(val_acc)
            seconds = time.perf_counter() - started
            record.update(val_acc=val_acc, val_ci95=val_ci95, max_acc=self.max_acc, time=seconds,
                          train_time=train_seconds,
                          train_images_per_s=images * self.procs.world_size / max(train_seconds, 1e-9))
            self.run.record(record)
            print(f"epoch {epoch}: lr {lr:.4g} loss {loss:.4f} train acc {acc:.4f} val acc {val_acc:.4f} "
                  f"+- {val_ci95:.4f} (best {self.max_acc:.4f} @ {self.max_acc_epoch}) {seconds:.0f} s", flush=True)
        return record

    def fit(self) -> dict:
        """Train from ``self.epoch`` to ``--pre_max_epoch``; Ctrl-C or SIGTERM saves ``last.pth`` and exits."""
        a = self.args
        # refuse validation episodes the split cannot fill now, not after the first epoch of training
        EpisodeSampler(self.val_targets, a.way, a.shot, a.val_query, a.val_episodes, name=f"{a.dataset} val")
        if self.procs.is_main:
            self.run = RunFolder(self.run_dir, a, resume=a.resume)
            self.run.log.truncate_after("epoch", self.epoch)
        with StopRequest("this batch", announce=self.procs.is_main) as stop:
            for epoch in range(self.epoch + 1, a.pre_max_epoch + 1):
                lr = self.begin_epoch()
                started = time.perf_counter()
                if not self.train_epoch(epoch, stop):
                    if self.procs.is_main:
                        self.save_last(val_acc=float("nan"))
                    stop.exit_for_resume(self.run_dir, f"stopped in epoch {epoch} after batch {self.batch}")
                self.epoch, self.batch = epoch, 0
                self.end_epoch(epoch, lr, time.perf_counter() - started, started)  # writes last.pth
                if epoch < a.pre_max_epoch and self.stop_requested(stop):
                    stop.exit_for_resume(self.run_dir, f"stopped after epoch {epoch}")
        return {"run_dir": str(self.run_dir), "max_acc": self.max_acc, "max_acc_epoch": self.max_acc_epoch,
                "epochs": self.epoch}


def main(args: argparse.Namespace) -> dict:
    """Pretrain, validate each epoch, write the run folder; returns the summary (``run_dir``, ``max_acc``, ...).

    Args:
        args: the flags of :mod:`trainer.pre_flags`; from code, ``utils.cli.parser_defaults(build_parser(), ...)``.
    """
    device = resolve_device(args.device, args.threads)
    procs, device = init_processes(device)
    try:
        if args.run_dir is None:
            if args.resume:
                raise InputError("--resume needs --run_dir: the folder of the run to continue.")
            args.run_dir = str(default_run_dir("pre", args.dataset, args.model_type))
        set_seed(args.seed, args.deterministic)
        if device.type == "cuda" and not args.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed 84x84 inputs: pick the fastest conv once
        trainer = Pretrainer(args, device, procs)
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
        if procs.is_main:
            print(f"best val acc {summary['max_acc']:.4f} at epoch {summary['max_acc_epoch']}; "
                  f"backbone: {Path(summary['run_dir']) / 'max_acc.pth'}")
        return summary
    finally:
        if procs.distributed:
            dist.destroy_process_group()
