"""Speed measurements: each script prints one JSON line of figures (never timed assertions in tests).

    python bench/meta.py --device cpu --threads 1      # meta stage: episodes/s against a plain reference
    python bench/pretrain.py --device cuda             # pretraining: input pipelines, training steps, an epoch
    bash bench/gpu.sh                                  # both, sized for a few minutes on one GPU
    python bench/gpu_run.py --data <cut> --out <logs>  # on one GPU: the CUDA tests, both benches, the recipe

This module holds what both scripts share: the common flags, the machine description, timing with a device
sync, peak memory, and the summary of their JSON lines. Results go to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from utils import git_commit, resolve_device
from utils.cli import add_device_flags


def bench_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every bench script takes: --device, --threads, --seed and --quick."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_device_flags(parser, "auto (CUDA when present), cpu, cuda or cuda:N")
    add("--seed", type=int, default=0, help="seeds the synthetic data and the models")
    add("--quick", action="store_true", help="tiny sizes: a smoke test in seconds, not a measurement")
    return parser


def fill_unset(args: argparse.Namespace, defaults: dict[str, int]) -> None:
    """Give every flag named in ``defaults`` that was left unset (<= 0) its value there (a device-dependent size)."""
    for key, value in defaults.items():
        if getattr(args, key) <= 0:
            setattr(args, key, value)


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --seed; return the device."""
    torch.manual_seed(args.seed)
    return resolve_device(args.device, args.threads)


def _proc_field(path: str, pattern: str) -> str | None:
    """The first group of the regex ``pattern`` (one line) in a /proc file; None where either is absent."""
    try:
        found = re.search(pattern, Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1).strip() if found else None


def machine(device: torch.device) -> dict:
    """What a figure was measured on: device, torch version, threads, CPU, load average and commit."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": _proc_field("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor() or "unknown",
            "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
            "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds that ``work()`` takes, device work included (synchronised before and after); and its result."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Measure the peak memory of the block into the yielded dict: ``peak_mb`` and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, reset at entry). CPU: the peak resident set size
    (VmHWM), reset at entry by writing 5 to /proc/self/clear_refs where the kernel allows it; otherwise the
    process's peak since start, an upper bound (``peak_kind`` says which).
    """
    record: dict = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield record
        synchronize(device)
        record.update(peak_mb=torch.cuda.max_memory_allocated(device) / 2**20, peak_kind="cuda_max_allocated")
        return
    kind = "rss_block"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        kind = "rss_process"
    yield record
    peak_kb = _proc_field("/proc/self/status", r"^VmHWM:\s*(\d+)\s*kB")  # the peak resident set size
    record.update(peak_mb=int(peak_kb) / 1024 if peak_kb else None, peak_kind=kind)


@contextmanager
def cpu_time() -> Iterator[dict]:
    """CPU seconds of the block into the yielded dict: ``user_s`` and ``system_s`` of this process, and
    ``workers_system_s`` of its child processes that ended within it (DataLoader workers of one epoch)."""
    record: dict = {}
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    yield record
    own_end, children_end = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    record.update(user_s=own_end.ru_utime - own.ru_utime, system_s=own_end.ru_stime - own.ru_stime,
                  workers_system_s=children_end.ru_stime - children.ru_stime)


def emit(record: dict) -> None:
    """Print the one JSON line of a bench script (floats rounded to 4 significant digits)."""
    print(json.dumps(_rounded(record), separators=(",", ":")), flush=True)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def print_summary(path: str | Path) -> None:
    """A short table of the figures in a JSON-lines file of bench results (what ``bench/gpu.sh`` prints last)."""
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        print(f"{record['bench']} on {record.get('gpu', record['cpu'])}, torch {record['torch']}, "
              f"load {record['load_avg']}")
        if record["bench"] == "pretrain":
            for row in record["pipeline"]:
                print(f"  pipeline {row['impl']:13} batch {row['batch_size']:4}: {row['images_per_s']:9.0f} img/s")
            for row in record["steps"]:
                variant = f"{row['precision']}{' channels_last' if row['channels_last'] else ''}" \
                          f"{' compile' if row['compile'] else ''}"
                print(f"  step {row['model']:6} batch {row['batch_size']:4} {variant:26}: "
                      f"{row['images_per_s']:7.0f} img/s, peak {row['peak_mb']:.0f} MB")
            for row in record["epoch"]:
                print(f"  epoch --augment {row['augment']:5} amp {row['amp']!s:5}: {row['images']} images in "
                      f"{row['seconds']:.1f} s = {row['images_per_s']:.0f} img/s")
            for row in record.get("allocator", []):
                print(f"  allocator {row['malloc']:7} {row['model']:6} {row['part']:11} batch {row['batch_size']:4}: "
                      f"{row['images_per_s']:7.1f} img/s, system {row['system_s']:.1f} s (workers "
                      f"{row['workers_system_s']:.1f} s), user {row['user_s']:.1f} s, peak {row['peak_mb']:.0f} MB")
            print(f"  ratios {record['ratios']}")
        else:
            inner = {(r["impl"], r["shot"]): r for r in record.get("inner", [])}
            for (impl, shot), row in inner.items():
                reference = inner.get(("reference", shot))
                if impl == "ours" and reference:
                    print(f"  inner loop {shot}-shot reset: {row['episodes_per_s']:7.1f} ep/s on {row['threads']} "
                          f"threads, plain_fit_regressor {reference['episodes_per_s']:6.1f} ep/s on "
                          f"{reference['threads']} ({row['ratio']:.1f}x)")
            rows = {(r["impl"], r["head"], r["shot"], r["mode"], r["phase"]): r for r in record["rows"]}
            for (impl, head, shot, mode, phase), row in rows.items():
                if impl != "reference" or phase != "eval":
                    continue
                line = f"  {head:6} {shot}-shot: reference {row['episodes_per_s']:6.1f} ep/s"
                for mode_ in ("carry", "reset"):
                    ours = rows.get(("ours", head, shot, mode_, "test"))
                    if ours:
                        line += (f" | {mode_} test {ours['episodes_per_s']:7.1f} ep/s "
                                 f"({ours['episodes_per_s'] / row['episodes_per_s']:.1f}x, "
                                 f"{600 / ours['episodes_per_s']:.1f} s per 600, peak {ours['peak_mb']:.0f} MB)")
                print(line)
