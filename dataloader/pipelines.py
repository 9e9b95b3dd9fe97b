"""The pretraining input pipelines (``--augment``): which images form each batch, and how they are transformed.

* ``batch`` (:class:`DeviceBatches`): the uint8 training array is one tensor (on the GPU when it fits, pinned
  otherwise); each batch is augmented on the device by ``dataloader.batch_augment.train_augment``.
* ``pil`` (:class:`PilBatches`): the original per-image torchvision transforms on PIL images, in DataLoader
  workers.
* ``none`` (:class:`DeviceBatches` without augmentation): the eval transform only, for debugging and
  over-fitting checks.

All three visit the same images in the same batches (:func:`epoch_batches`): a per-epoch
``DistributedSampler`` permutation, sharded across processes under ``torchrun``.
"""
from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataloader.batch_augment import eval_transform, torchvision_train_transform, train_augment
from dataloader.datasets import ImageDataset
from utils.distributed import Processes


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, procs: Processes,
                  max_batches: int = 0) -> list[torch.Tensor]:
    """This process's batches of sample indices for ``epoch``: a DistributedSampler permutation, batched.

    Every process gets the same number of batches (DDP needs it). A last batch of one sample is dropped:
    BatchNorm cannot train on it.

    Args:
        batch_size: per process.
        max_batches: keep only the first ones (0: all).
    Returns:
        (B,) long tensors of indices into the training split, B <= ``batch_size``.
    """
    sampler = DistributedSampler(range(num_samples), num_replicas=procs.world_size, rank=procs.rank,
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(torch.tensor(list(sampler), dtype=torch.long).split(batch_size))
    if batches and len(batches[-1]) < 2:
        batches.pop()
    return batches[:max_batches] if max_batches > 0 else batches


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of one batch's augmentation: a pure function of its position, so a resumed epoch redraws it."""
    return (seed * 1_000_003 + epoch * 10_007 + batch) * 101 + rank


def to_device_if_it_fits(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``images`` to the GPU when they take under half of its free memory; else pin them (CPU stays)."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() < free // 2:
        return images.to(device)
    return images.pin_memory()


class DeviceBatches:
    """The ``batch`` and ``none`` pipelines: the uint8 training array as one tensor, transformed per batch.

    Args:
        images: (N, 84, 84, 3) uint8; targets: (N,).
        mean, std: the backbone's input normalisation.
        seed: the run's ``--seed``, from which every batch's augmentation seed derives (:func:`batch_seed`).
        augment: ``train_augment`` when True, else ``eval_transform``.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, mean, std, device: torch.device, seed: int,
                 augment: bool, channels_last: bool):
        self.images = to_device_if_it_fits(torch.from_numpy(images), device)
        self.targets = torch.from_numpy(targets).to(self.images.device)
        self.mean, self.std, self.device, self.seed = mean, std, device, seed
        self.augment, self.channels_last = augment, channels_last

    def __call__(self, batches: list[torch.Tensor], epoch: int, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs (B, 3, 84, 84) float, labels (B,)) on the device for every batch of the epoch."""
        for number, indices in enumerate(batches):
            indices = indices.to(self.images.device)
            # index_select, not images[indices]: advanced indexing is ~20x slower on a CPU (0.46 vs 0.02 ms per 16)
            images = self.images.index_select(0, indices).to(self.device, non_blocking=True)
            labels = self.targets[indices].to(self.device, non_blocking=True)
            if self.augment:
                generator = torch.Generator(self.device).manual_seed(batch_seed(self.seed, epoch, number, rank))
                inputs = train_augment(images, self.mean, self.std, generator, channels_last=self.channels_last)
            else:
                inputs = eval_transform(images, self.mean, self.std, channels_last=self.channels_last)
            yield inputs, labels


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and SIGTERM are for the main process, which stops at its next batch
    and then shuts the workers down; a worker killed by them would instead fail the batch under way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PilBatches:
    """The ``pil`` pipeline, the original's: torchvision transforms per PIL image in DataLoader workers.

    Args: as :class:`DeviceBatches`, plus ``num_workers`` (DataLoader worker processes).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, mean, std, device: torch.device, seed: int,
                 num_workers: int, channels_last: bool):
        self.dataset = ImageDataset(images, targets, torchvision_train_transform(mean, std))
        self.device, self.seed, self.num_workers, self.channels_last = device, seed, num_workers, channels_last

    def __call__(self, batches: list[torch.Tensor], epoch: int, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs (B, 3, 84, 84) float, labels (B,)) on the device for every batch of the epoch."""
        # workers draw their transform seeds from this generator, a function of the epoch
        generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, 0, rank))
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches],
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            generator=generator, persistent_workers=False,
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for inputs, labels in loader:
            yield (inputs.to(self.device, non_blocking=True, memory_format=memory_format),
                   labels.to(self.device, non_blocking=True))
