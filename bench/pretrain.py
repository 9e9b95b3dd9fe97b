"""Pretraining speed: input pipelines, training steps and a whole epoch of the real trainer, in images/s.

    python bench/pretrain.py --device cpu --threads 1 --num_workers 2
    python bench/pretrain.py --device cuda --num_workers 14            # batch 128, miniImageNet-sized epoch
    python bench/pretrain.py --device cpu --threads 2 --parts allocator --models conv4 res12 --batch_size 128

On synthetic uint8 images (N, 84, 84, 3) it measures

(a) the input pipeline alone: the original way (PIL torchvision transforms in ``--num_workers`` DataLoader
    workers, batches copied to the device) against ours (``dataloader.batch_augment.train_augment`` on whole
    batches already on the device);
(b) one training step (forward, backward, Nesterov SGD step) of each backbone of ``--models`` with a linear
    classifier over 64 classes: fp32, and on CUDA also bf16 autocast + channels_last (``--compile`` adds a
    ``torch.compile``-d variant);
(c) one epoch of ``trainer.pre.Pretrainer.train_epoch`` on ``--epoch_images`` images written as a prepared
    dataset: ``--augment batch`` (bf16 + channels_last on CUDA) against ``--augment pil`` (fp32);
(d) only when asked for (``--parts allocator``, on the CPU): (b) and (c) for each of ``--models`` with glibc's
    default allocator against freed memory kept in the process (``utils.runtime.keep_freed_memory``), each in
    a child process of its own (the setting holds for a whole process), alternating, ``--repeats`` rounds.

Every measurement follows a warm-up; steps and epochs also report their user and system CPU seconds. Prints
one JSON line with ``pipeline``, ``steps``, ``epoch`` and ``allocator`` rows and the ratios ours / original
(for (d): kept / default, the median over the rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository root on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bench import bench_parser, cpu_time, emit, fill_unset, machine, peak_memory, setup, synchronize, timed
from dataloader.batch_augment import torchvision_train_transform, train_augment
from dataloader.datasets import ImageDataset
from dataloader.prepare import write_split
from dataloader.transforms import normalization
from models import BACKBONES, build_backbone
from trainer.pre import Pretrainer
from trainer.pre_flags import build_parser as pretrain_parser
from utils.cli import parser_defaults
from utils.distributed import Processes
from utils.interrupt import StopRequest
from utils.runtime import MALLOC_ENV, autocast

NUM_CLASSES = 64
PARTS = ("pipeline", "steps", "epoch", "allocator")


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    add = parser.add_argument
    add("--batch_size", type=int, default=0, help="images per batch (0: 128 on CUDA, 16 on a CPU)")
    add("--models", nargs="+", default=["res12", "wrn28"], choices=sorted(BACKBONES),
        help="backbones whose training step is timed")
    add("--wrn_batch_size", type=int, default=0,
        help="batch of the wrn28 step (0: --batch_size on CUDA, 2 on a CPU, where one step of 16 takes minutes)")
    add("--steps", type=int, default=0, help="timed training steps per variant (0: 10 on CUDA, 2 on a CPU)")
    add("--warmup_steps", type=int, default=0, help="untimed steps first (0: 3 on CUDA, 1 on a CPU)")
    add("--compile", action="store_true", help="also time a torch.compile-d step (compiling takes a while)")
    add("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
        help="DataLoader workers of the PIL path (pretraining's default)")
    add("--pipeline_images", type=int, default=0,
        help="images through each input pipeline (0: 8192 on CUDA, 512 on a CPU)")
    add("--repeats", type=int, default=3,
        help="measurements of each input pipeline, rounds of the allocator comparison (the median is reported)")
    add("--pipeline_batch_sizes", type=int, nargs="+", default=None,
        help="batch sizes of the batched pipeline (default: --batch_size); the PIL path uses --batch_size")
    add("--epoch_images", type=int, default=-1,
        help="images of the timed epoch (-1: 38400, miniImageNet's training split, on CUDA; 64 on a CPU; 0: skip)")
    add("--epoch_model", default="res12", choices=sorted(BACKBONES), help="backbone of the timed epoch")
    add("--parts", nargs="+", default=list(PARTS[:3]), choices=PARTS,
        help="what to measure: the input pipelines, the training steps, the epoch; allocator: steps and epoch "
             "with glibc's default allocator against freed memory kept, on the CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.epoch_model, args.batch_size, args.wrn_batch_size = ["conv4"], "conv4", 4, 2
        args.steps, args.warmup_steps, args.num_workers, args.pipeline_images = 1, 1, 1, 16
        args.epoch_images, args.repeats = 8, 1
    return args


def resolve_sizes(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the 0 / -1 defaults for the device: full sizes on CUDA, minutes-sized ones on a CPU."""
    cuda = device.type == "cuda"
    fill_unset(args, {"batch_size": 128 if cuda else 16, "steps": 10 if cuda else 2, "warmup_steps": 3 if cuda else 1,
                      "pipeline_images": 8192 if cuda else 512})
    if args.wrn_batch_size <= 0:
        args.wrn_batch_size = args.batch_size if cuda else 2
    if args.epoch_images < 0:
        args.epoch_images = 38400 if cuda else 64
    args.pipeline_batch_sizes = args.pipeline_batch_sizes or [args.batch_size]
    return args


def synthetic_images(count: int, generator: np.random.Generator) -> np.ndarray:
    """(count, 84, 84, 3) uint8 noise images: the transforms' cost does not depend on the content."""
    return generator.integers(0, 256, size=(count, 84, 84, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- (a) pipelines
def pil_pipeline(images: np.ndarray, args: argparse.Namespace, device: torch.device) -> tuple[int, float]:
    """The original: torchvision transforms per PIL image in DataLoader workers, batches copied to the device.
    Returns (images, seconds); the first batch (the workers' start) is not timed."""
    mean, std = normalization("res12")
    dataset = ImageDataset(images, np.zeros(len(images), dtype=np.int64), torchvision_train_transform(mean, std))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    batches = iter(loader)
    next(batches)
    count = 0

    def run():
        nonlocal count
        for inputs, labels in batches:
            inputs.to(device, non_blocking=True)
            count += len(labels)

    seconds, _ = timed(run, device)
    return count, seconds


def batched_pipeline(images: torch.Tensor, batch_size: int, args: argparse.Namespace,
                     device: torch.device) -> tuple[int, float]:
    """Ours: ``train_augment`` on random batches of the uint8 array already on the device, as DeviceBatches.
    Returns (images, seconds), after a two-batch warm-up."""
    mean, std = normalization("res12")
    generator = torch.Generator(device).manual_seed(args.seed)
    channels_last = device.type == "cuda"
    order = torch.randperm(len(images), device=device)
    batches = order.split(batch_size)[:max(1, len(images) // batch_size)]

    def run(chosen):
        for indices in chosen:
            train_augment(images.index_select(0, indices), mean, std, generator, channels_last=channels_last)

    run(batches[:2])
    seconds, _ = timed(lambda: run(batches), device)
    return sum(len(b) for b in batches), seconds


def pipelines(images: np.ndarray, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Both pipelines, ``--repeats`` times, interleaved (so a change of load hits both alike); the median rate."""
    device_images = torch.from_numpy(images).to(device)
    runs = {("pil", args.batch_size): [], **{("batch_augment", size): [] for size in args.pipeline_batch_sizes}}
    for _ in range(args.repeats):
        for impl, size in runs:
            if impl == "pil":
                runs[impl, size].append(pil_pipeline(images, args, device))
            else:
                runs[impl, size].append(batched_pipeline(device_images, size, args, device))
    rows = []
    for (impl, size), measured in runs.items():
        rates = [count / seconds for count, seconds in measured]
        rows.append({"impl": impl, "batch_size": size, "workers": args.num_workers if impl == "pil" else 0,
                     "images": measured[0][0], "repeats": len(rates), "images_per_s": float(np.median(rates)),
                     "images_per_s_all": rates})
    return rows


# ---------------------------------------------------------------------------------------------- (b) steps
def training_step(name: str, batch_size: int, amp: bool, channels_last: bool, compile_: bool,
                  args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of forward + backward + Nesterov SGD step (the recipe's optimizer) on a fixed random batch."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    backbone = build_backbone(name).to(device, memory_format=memory_format)
    model: nn.Module = nn.Sequential(backbone, nn.Linear(backbone.out_dim, NUM_CLASSES).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if compile_:
        model = torch.compile(model)
    inputs = torch.randn(batch_size, 3, 84, 84, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def steps(count: int):
        for _ in range(count):
            with autocast(device, amp):
                loss = F.cross_entropy(model(inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    steps(args.warmup_steps)
    with peak_memory(device) as memory, cpu_time() as cpu:
        seconds, _ = timed(lambda: steps(args.steps), device)
    return {"model": name, "precision": "bf16" if amp else "fp32", "channels_last": channels_last,
            "compile": compile_, "batch_size": batch_size, "steps": args.steps, "seconds": seconds,
            "images_per_s": batch_size * args.steps / seconds, **memory, **cpu}


def step_variants(device: torch.device, compile_: bool) -> list[tuple[bool, bool, bool]]:
    """(amp, channels_last, compile) variants: fp32 everywhere; bf16 + channels_last (+ compile) on CUDA."""
    if device.type != "cuda":
        return [(False, False, False)]
    return [(False, False, False), (True, True, False)] + ([(True, True, True)] if compile_ else [])


# ---------------------------------------------------------------------------------------------- (c) epoch
def write_dataset(root: Path, args: argparse.Namespace) -> None:
    """A prepared ``mini`` dataset of synthetic images: --epoch_images training images, a small val split."""
    generator = np.random.default_rng(args.seed)
    num_classes = min(NUM_CLASSES, args.epoch_images)
    train_targets = np.arange(args.epoch_images) % num_classes
    write_split(root / "mini", "train", synthetic_images(args.epoch_images, generator), train_targets,
                np.zeros((num_classes, 4), np.float32), [f"train{c}" for c in range(num_classes)])
    val_targets = np.arange(5 * 2) % 5
    write_split(root / "mini", "val", synthetic_images(len(val_targets), generator), val_targets,
                np.zeros((5, 4), np.float32), [f"val{c}" for c in range(5)])


def epoch_rate(root: Path, augment: str, fast: bool, args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of ``Pretrainer.train_epoch`` over the whole training split (after a two-batch warm-up)."""
    on_off = "on" if fast else "off"
    run_args = parser_defaults(
        pretrain_parser(), data_root=str(root), dataset="mini", model_type=args.epoch_model, device=str(device),
        pre_batch_size=args.batch_size, augment=augment, num_workers=args.num_workers, amp=on_off,
        channels_last=on_off, run_dir=str(root / "run"), seed=args.seed, way=5, shot=1, val_query=1,
        val_episodes=1, max_train_batches=2)
    trainer = Pretrainer(run_args, device, Processes())
    trainer.train_epoch(1, StopRequest())
    run_args.max_train_batches = 0
    with peak_memory(device) as memory, cpu_time() as cpu:
        seconds, _ = timed(lambda: trainer.train_epoch(2, StopRequest()), device)
    images = int(trainer.images_seen)
    return {"augment": augment, "model": args.epoch_model, "amp": fast, "channels_last": fast,
            "workers": args.num_workers if augment == "pil" else 0, "batch_size": args.batch_size,
            "images": images, "seconds": seconds, "images_per_s": images / seconds, **memory, **cpu}


# ---------------------------------------------------------------------------------------------- (d) allocator
def allocator_child(name: str, choice: str, args: argparse.Namespace) -> dict:
    """The JSON record of this script run for ``--parts steps epoch`` of backbone ``name`` on the CPU, in a
    child process whose environment sets ``TASNET_MALLOC=choice``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--threads", str(args.threads),
               "--seed", str(args.seed), "--parts", "steps", "epoch", "--models", name, "--epoch_model", name]
    for key in ("batch_size", "wrn_batch_size", "steps", "warmup_steps", "epoch_images", "num_workers"):
        command += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(command, env={**os.environ, MALLOC_ENV: choice}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} with {MALLOC_ENV}={choice} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def allocator(args: argparse.Namespace) -> list[dict]:
    """Step and epoch rows of each of ``--models``, with glibc's default allocator and with freed memory kept,
    alternating, for ``--repeats`` rounds."""
    rows = []
    for round_ in range(args.repeats):
        for name in args.models:
            for choice in ("default", "keep"):
                record = allocator_child(name, choice, args)
                parts = [("step", r) for r in record["steps"]] + [(f"epoch {r['augment']}", r) for r in record["epoch"]]
                rows += [{"malloc": choice, "round": round_, "model": name, "part": part,
                          "batch_size": row["batch_size"], "load_avg": record["load_avg"],
                          **{key: row[key] for key in ("images_per_s", "seconds", "user_s", "system_s",
                                                       "workers_system_s", "peak_mb", "peak_kind")}}
                         for part, row in parts]
    return rows


def allocator_ratios(rows: list[dict]) -> dict[str, float]:
    """Per ``"<model> <part>"``: the median over the rounds of images/s kept / images/s default."""
    rates: dict = {}
    for row in rows:
        rates.setdefault(f"{row['model']} {row['part']}", {}).setdefault(row["round"], {})[row["malloc"]] = \
            row["images_per_s"]
    return {key: float(np.median([r["keep"] / r["default"] for r in rounds.values()]))
            for key, rounds in rates.items()}


def ratio(rows: list[dict], ours: dict, original: dict) -> float | None:
    """images/s of the first row matching ``ours`` over that of the first row matching ``original``."""
    def rate(match):
        return next((r["images_per_s"] for r in rows if all(r.get(k) == v for k, v in match.items())), None)
    fast, slow = rate(ours), rate(original)
    return fast / slow if fast and slow else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = setup(args)
    args = resolve_sizes(args, device)
    started = machine(device)  # before the work: the load average it ran under
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as trainer.pre.main: fixed 84x84 inputs
    generator = np.random.default_rng(args.seed)
    images = synthetic_images(args.pipeline_images, generator)

    pipeline, steps, epoch, allocation = [], [], [], []
    if "pipeline" in args.parts:
        pipeline = pipelines(images, args, device)

    for name in args.models if "steps" in args.parts else []:
        batch_size = args.wrn_batch_size if name == "wrn28" else args.batch_size
        for amp, channels_last, compile_ in step_variants(device, args.compile):
            steps.append(training_step(name, batch_size, amp, channels_last, compile_, args, device))
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if "epoch" in args.parts and args.epoch_images > 0:
        with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as folder:
            write_dataset(Path(folder), args)
            fast = device.type == "cuda"
            epoch = [epoch_rate(Path(folder), "batch", fast, args, device),
                     epoch_rate(Path(folder), "pil", False, args, device)]

    if "allocator" in args.parts:
        allocation = allocator(args)

    record = {
        "bench": "pretrain", **started,
        "config": {key: getattr(args, key) for key in (
            "batch_size", "wrn_batch_size", "models", "steps", "warmup_steps", "compile", "num_workers",
            "repeats", "pipeline_images", "pipeline_batch_sizes", "epoch_images", "epoch_model", "parts", "threads",
            "quick")},
        "pipeline": pipeline, "steps": steps, "epoch": epoch, "allocator": allocation,
        "ratios": {
            "pipeline_batch_over_pil": ratio(pipeline, {"impl": "batch_augment", "batch_size": args.batch_size},
                                             {"impl": "pil"}),
            "step_bf16_cl_over_fp32": ratio(steps, {"model": args.models[0], "precision": "bf16", "compile": False},
                                            {"model": args.models[0], "precision": "fp32"}),
            "epoch_batch_over_pil": ratio(epoch, {"augment": "batch"}, {"augment": "pil"}),
            "allocator_keep_over_default": allocator_ratios(allocation),
        },
        "load_avg_end": list(os.getloadavg()),
    }
    emit(record)
    return record


if __name__ == "__main__":
    main()
