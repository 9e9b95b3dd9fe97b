"""The embedded demo end to end (``run_demo.py``): every stage of the method on a CPU in minutes.

1. data      ``<data_root>/demo``: drawn by :mod:`dataloader.demo` when absent
2. pretrain  the backbone on the 48 training classes (``trainer.pre``, run_pre.py's recipe, few epochs)
3. features  ``<data_root>/demo/<backbone>/feat-<split>.npz``, re-extracted from this run's best backbone
4. protonet  the ProtoNet baseline of that backbone (``trainer.evaluate.proto_baseline``)
5. fusion    TasNet, fusion head (``trainer.meta``), trained and tested per shot
6. concat    TasNet, concatenation head, the same
then :mod:`trainer.report`'s table of test accuracies (mean +- 95% CI), every method on the same test episodes.
Every stage is called as a function with its command's defaults except for the flags the demo sets here.

The run folder::

    <run_dir>/pretrain/          run_pre.py's folder: config.json, log.jsonl, curves.png, max_acc.pth, last.pth
    <run_dir>/protonet/          result.json
    <run_dir>/{fusion,concat}/shot<K>/   config.json, log.jsonl, curves.png, max_acc.pth, result.json
    <run_dir>/results.json       the table, the settings and the wall time of every stage
    <run_dir>/results.{md,csv,png}   trainer.report's table (the .md with the notes under it), CSV and bar chart
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dataloader.datasets import SPLITS
from dataloader.demo import SPLIT_SIZES, ensure_demo_dataset
from trainer import meta, meta_config, pre, pre_flags, proto_flags, report
from trainer.evaluate import proto_baseline
from trainer.extract import extract_splits, load_backbone
from trainer.runs import default_run_dir
from utils import InputError, resolve_device, resolve_path, save_json
from utils.cli import parser_defaults
from utils.io import atomic_write

DATASET = "demo"
HEADS = ("fusion", "concat")
STAGES = ("data", "pretrain", "features", "protonet") + HEADS
DESCRIPTION = "synthetic colour-pattern-shape images, real GloVe 6B 50-d semantics"
BACKBONE_NOTES = {
    "conv4_28": "Conv-4 on the images average-pooled from 84x84 to 28x28, 64-d features",
    "conv4": "Conv-4 at 84x84, 64-d features",
    "res12": "ResNet-12, 640-d features",
    "wrn28": "WRN-28-10, 640-d features",
}

# What --quick changes (CI: every stage runs, in well under 3 minutes on 2 cores). 20 images per class is
# the least a 5-shot episode with 15 queries needs.
QUICK = dict(images_per_class=20, pre_epochs=1, pre_val_episodes=50, max_epoch=1, num_batch=20,
             val_episodes=20, test_episodes=100)
# --quick draws its smaller dataset into <data_root>/quick/demo, leaving a full-size <data_root>/demo alone.
QUICK_SUBFOLDER = "quick"


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the :data:`QUICK` settings when ``args.quick`` (else an unchanged copy)."""
    args = argparse.Namespace(**vars(args))
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.data_root = str(resolve_path(args.data_root) / QUICK_SUBFOLDER)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that would fail only minutes into the run."""
    for name in ("images_per_class", "pre_epochs", "pre_val_episodes", "max_epoch", "num_batch", "val_episodes",
                 "test_episodes", "query"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if min(args.shot) < 1:
        raise InputError(f"--shot must list positive numbers, got {args.shot}.")
    fewest_classes = min(SPLIT_SIZES.values())
    if not 2 <= args.way <= fewest_classes:
        raise InputError(f"--way {args.way}: the demo's smallest split has {fewest_classes} classes; choose 2 to "
                         f"{fewest_classes}.")
    needed = max(args.shot) + args.query
    if args.images_per_class < needed:
        raise InputError(f"--images_per_class {args.images_per_class}: a {max(args.shot)}-shot episode with "
                         f"--query {args.query} needs {needed} images per class; draw more or lower --query.")


@contextmanager
def stage(seconds: dict[str, float], name: str, what: str):
    """Print a header for the stage ``name``, run the block, record its wall time in ``seconds``."""
    print(f"\n== [{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}", flush=True)
    started = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - started
    print(f"== {name} done in {seconds[name]:.0f} s", flush=True)


def pretrain(args: argparse.Namespace, run_dir: Path) -> tuple[Path, float]:
    """Stage 2: pretraining on the demo data; returns the best backbone checkpoint and its validation accuracy."""
    pre_args = parser_defaults(
        pre_flags.build_parser(), dataset=DATASET, data_root=args.data_root, model_type=args.model_type,
        pre_max_epoch=args.pre_epochs, pre_lr=args.pre_lr, pre_step_size=args.pre_step_size,
        val_episodes=args.pre_val_episodes, seed=args.seed, device=args.device, run_dir=str(run_dir))
    summary = pre.main(pre_args)
    return Path(summary["run_dir"]) / "max_acc.pth", summary["max_acc"]


def protonet(args: argparse.Namespace, weights: Path, run_dir: Path) -> dict[int, dict]:
    """Stage 4: the ProtoNet baseline on the cached features; returns shot -> {acc, ci95}."""
    proto_args = parser_defaults(
        proto_flags.build_parser(), dataset=DATASET, data_root=args.data_root, model_type=args.model_type,
        init_weights=str(weights), way=args.way, shot=list(args.shot), query=args.query,
        episodes=args.test_episodes, seed=args.seed, device=args.device, threads=args.threads,
        run_dir=str(run_dir))
    result = proto_baseline(proto_args)
    return {shot: result["shots"][str(shot)] for shot in args.shot}


def tasnet(args: argparse.Namespace, head: str, weights: Path, run_dir: Path) -> dict[int, dict]:
    """Stages 5 and 6: the meta stage with ``head`` for every shot; returns shot -> {acc, ci95, ...}."""
    meta_args = parser_defaults(
        meta_config.build_parser(), head=head, dataset=DATASET, data_root=args.data_root, model_type=args.model_type,
        init_weights=str(weights), way=args.way, shot=list(args.shot), train_query=args.query,
        val_query=args.query, test_query=args.query, max_epoch=args.max_epoch, num_batch=args.num_batch,
        val_episodes=args.val_episodes, test_episodes=args.test_episodes, inner_state=args.inner_state,
        seed=args.seed, device=args.device, run_dir=str(run_dir))
    kept = ("inner_state", "test_acc_reset", "test_ci95_reset", "test_acc_carry", "test_ci95_carry",
            "carry_block_acc", "metric", "lamda", "normalize_input", "val_best_acc", "val_best_epoch")
    return {r["shot"]: {"acc": r["test_acc"], "ci95": r["test_ci95"], **{key: r[key] for key in kept}}
            for r in meta.main(meta_args)}


def footer(args: argparse.Namespace, pre_acc: float, table: dict[str, dict[int, dict]]) -> list[str]:
    """What the table was measured with, below it."""
    fusion, concat = table["fusion"][args.shot[0]], table["concat"][args.shot[0]]
    return [
        f"backbone {args.model_type} ({BACKBONE_NOTES.get(args.model_type, 'see models/')}), pretrained "
        f"{args.pre_epochs} epoch(s) (best validation ProtoNet 1-shot {pre_acc:.4f})",
        f"meta stage: {args.max_epoch} epoch(s) x {args.num_batch} training episodes, {args.val_episodes} "
        f"validation episodes per epoch (the paper: 10 x 100), {args.query} queries per class; fusion: lamda "
        f"{fusion['lamda']} (weight of the visual part), {fusion['metric']} metric; concat: {concat['metric']} "
        f"metric, input features L2-normalised: {concat['normalize_input']}",
        f"TasNet trained with --inner_state {args.inner_state}, each checkpoint tested twice on the same episodes: "
        f"reset, every episode fits the semantic regressor from the saved state (independent episodes); carry, "
        f"the release's protocol, the regressor carries over from episode to episode, so each test episode also "
        f"learns from the support sets of the earlier ones",
        f"all methods are scored on the same {args.test_episodes} test episodes (seed {args.seed})",
    ]


def check_results(table: dict[str, dict[int, dict]]) -> None:
    """Every accuracy must be a finite number in [0, 1] (a NaN here means a stage diverged)."""
    for method, shots in table.items():
        for shot, cell in shots.items():
            if not (math.isfinite(cell["acc"]) and 0.0 <= cell["acc"] <= 1.0 and math.isfinite(cell["ci95"])):
                raise RuntimeError(f"{method} {shot}-shot: accuracy {cell['acc']} +- {cell['ci95']} is not a "
                                   f"finite fraction; see its run folder.")


def run_demo(args: argparse.Namespace) -> dict:
    """``run_demo.py``: every stage, then the table (printed, and saved in the run folder). Returns results.json."""
    started = time.perf_counter()
    args = apply_quick(args)
    check_args(args)
    device = resolve_device(args.device, args.threads)
    run_dir = resolve_path(args.run_dir) if args.run_dir else default_run_dir(DATASET)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"demo run folder: {run_dir} (device {device}, {torch.get_num_threads()} thread(s))", flush=True)

    seconds, table = {}, {}
    with stage(seconds, "data", f"demo dataset in {resolve_path(args.data_root) / DATASET} "
                                f"({args.images_per_class} images per class; drawn only when absent)"):
        data_dir = ensure_demo_dataset(args.data_root, seed=args.data_seed, images_per_class=args.images_per_class)
    with stage(seconds, "pretrain", f"{args.model_type} for {args.pre_epochs} epoch(s) on the "
                                    f"{SPLIT_SIZES['train']} training classes"):
        weights, pre_acc = pretrain(args, run_dir / "pretrain")
    with stage(seconds, "features", f"{args.model_type} features of every split from {weights}"):
        feature_files = extract_splits(load_backbone(args.model_type, weights, device), args.data_root, DATASET,
                                       args.model_type, device, SPLITS, source=str(weights))
    with stage(seconds, "protonet", f"ProtoNet baseline, {args.test_episodes} test episodes"):
        table["protonet"] = protonet(args, weights, run_dir / "protonet")
    for head in HEADS:
        with stage(seconds, head, f"TasNet {head}: {args.max_epoch} epoch(s) x {args.num_batch} episodes, then "
                                  f"{args.test_episodes} test episodes, per shot"):
            table[head] = tasnet(args, head, weights, run_dir / head)
    check_results(table)

    notes = footer(args, pre_acc, table)
    total = time.perf_counter() - started
    timing = ", ".join(f"{name} {stage_s:.0f} s" for name, stage_s in seconds.items())
    notes.append(f"wall time {total:.0f} s ({timing}); run folder {run_dir}")
    # trainer.meta gives each shot a sub-folder only when there are several
    shot_dirs = [f"shot{shot}" if len(args.shot) > 1 else "" for shot in args.shot]
    results = {
        "table": {method: {str(shot): cell for shot, cell in shots.items()} for method, shots in table.items()},
        "notes": notes, "stage_seconds": seconds, "total_seconds": total, "run_dir": str(run_dir),
        "data_dir": str(data_dir), "backbone_checkpoint": str(weights),
        "feature_files": {split: str(path) for split, path in feature_files.items()},
        "result_files": {"protonet": [str(run_dir / "protonet" / "result.json")],
                         **{head: [str(run_dir / head / folder / "result.json") for folder in shot_dirs]
                            for head in HEADS}},
        "config": vars(args),
    }
    save_json(run_dir / "results.json", results)
    # exactly this run's files: a reused run folder may still hold result.json files of earlier demo runs
    _, table_md = report.report([path for paths in results["result_files"].values() for path in paths], run_dir)
    title = f"Demo ({DESCRIPTION}), {args.test_episodes} test episodes, {args.way}-way"
    notes_md = "".join(f"- {note}\n" for note in notes)
    with atomic_write(run_dir / "results.md", "w") as f:
        f.write(f"# Demo results\n\n{title}\n\n{table_md}\n\n{notes_md}")
    print("\n" + "\n".join([title, "", table_md, ""] + notes), flush=True)
    return results

