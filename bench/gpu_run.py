"""Everything a GPU machine should run, in one call: CUDA tests, the two benches, then the release recipe on the
miniImageNet cut, each step under its own time limit, all output logged to one folder.

    python bench/gpu_run.py --pack .devcarry/mini-cut.tar.gz     # here: the raw cut + GloVe 6B 50-d in one tar
    python3 bench/gpu_run.py --data .devcarry/mini-cut.tar.gz     # on the GPU machine (~9.5 min at most)
    python bench/gpu_run.py --dry                                 # here, on the CPU: tiny sizes, Conv-4
    python3 bench/gpu_run.py --data ... --only recipe --pre_epochs 110   # the recipe alone, the full schedule

Steps, most valuable first (``--only`` / ``--skip`` take step names or the groups tests, bench, recipe, meta):

1. ``env``: the card, torch and CUDA versions, the load average.
2. ``tests``: the device-parametrised tests (``tests/test_devices.py``: augmentation, inner loop, k-means and
   heads on cuda against the CPU) and the inner-loop, augmentation, k-means and head test files.
3. ``bench_meta``, ``bench_pretrain``: ``bench/meta.py`` (600 reset test episodes as one batch) and
   ``bench/pretrain.py`` (batch 128, a miniImageNet-sized epoch) at GPU sizes; their JSON lines go to
   ``bench.jsonl``.
4. ``unpack``, ``prepare``: the cut from ``--data`` (a folder or a tar holding ``mini-imagenet/`` and
   ``glove/glove.6B.50d.subset.txt``, the layout of the shared data folder) -> ``python -m dataloader.prepare``.
5. ``pretrain``: ``run_pre.py`` ResNet-12, bf16 and channels_last (auto on CUDA), ``--pre_epochs`` epochs (110
   in the release; the StepLR period is scaled with it, 30 of 110). Its time limit may end it early: the
   best epoch so far (``max_acc.pth``) is then what the next steps use.
6. ``extract``: ``python -m trainer.extract`` of the best backbone into the cached features.
7. ``meta_*``: ``run_fusion.py`` and ``run_concatenation.py`` (res12), ``--shot 1 5``, 600 test episodes,
   reset mode (fast) for ``--setting in`` and ``tran`` first, ``proto`` (``run_proto.py``, the feature
   baseline) and ``proto_finetune`` (only where run_proto.py has ``--finetune``), then carry mode.
8. ``report``: ``python -m trainer.report <run folders> --out <out>/report`` where trainer/report.py exists.

A step that fails or runs past its limit costs only its own figures (and those of the steps that need it).
``--budget`` bounds the whole call: a step's limit is cut to what is left, and the steps that no longer fit
are skipped (logged as such). Output, in ``--out`` (default ``$OUT``, else ``runs/gpu_run-<time>``), at most
8 files: ``gpu_run.log`` (every step's output), ``steps.jsonl`` (per step: status, exit code, seconds,
limit), ``bench.jsonl``, ``runs.tar.gz`` (every run folder's small files) and ``report/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the raw-data folder the real-data tests read (TASNET_DATA; see README, Tests)
SHARED = Path(os.environ.get("TASNET_DATA", REPO.parent / "shared" / "data"))
GLOVE = Path("glove") / "glove.6B.50d.subset.txt"
GROUPS = {"tests": ["env", "tests"], "bench": ["bench_meta", "bench_pretrain"],
          "meta": [f"meta_{state}_{head}_{setting}" for state in ("reset", "carry") for head in ("fusion", "concat")
                   for setting in ("in", "tran")] + ["proto", "proto_finetune"]}
GROUPS["recipe"] = ["unpack", "prepare", "pretrain", "extract", *GROUPS["meta"], "report"]
RELEASE_EPOCHS, RELEASE_STEP = 110, 30
SMALL_FILES = 1 << 20          # run-folder files up to this size go into runs.tar.gz (no checkpoints)


@dataclass
class Step:
    name: str
    limit: int                                   # seconds on the GPU machine
    command: list[str]
    needs: list[str] = field(default_factory=list)   # steps that must have succeeded first
    jsonl: bool = False                          # stdout is a bench's JSON line: keep it in bench.jsonl


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", default=os.environ.get("DATA", ""),
        help="the miniImageNet cut: a folder or a .tar / .tar.gz holding mini-imagenet/ and glove/ (env DATA; "
             "default in --dry: a synthetic cut made here)")
    add("--out", default=os.environ.get("OUT", ""), help="log folder (default $OUT, else runs/gpu_run-<time>)")
    add("--work", default="", help="prepared data, checkpoints and run folders (default .devcarry/gpu_work, "
                                   "ignored by git and outside $OUT, so that only the logs come back)")
    add("--budget", type=int, default=int(os.environ.get("BUDGET", 570)),
        help="seconds for the whole call; steps that no longer fit are skipped (default 570: one 10-min call)")
    add("--pre_epochs", type=int, default=int(os.environ.get("PRE_EPOCHS", 40)),
        help="pretraining epochs (110: the release; 40 fits one call after the benches; StepLR period scaled)")
    add("--test_episodes", type=int, default=600, help="test episodes of every meta run")
    add("--only", nargs="+", default=[], help="run only these steps or groups (tests, bench, recipe, meta)")
    add("--skip", nargs="+", default=[], help="skip these steps or groups")
    add("--dry", action="store_true", default=os.environ.get("DRY", "") == "1",
        help="tiny sizes on the CPU (--device cpu --threads 1, Conv-4, a synthetic cut unless --data): checks "
             "that every step runs")
    add("--python", default=sys.executable, help="the interpreter for every step")
    add("--pack", metavar="TAR", default="",
        help="make the --data tar from $TASNET_DATA (mini-imagenet/ and the GloVe file) and exit")
    return parser.parse_args(argv)


def expand(names: list[str]) -> set[str]:
    return {step for name in names for step in GROUPS.get(name, [name])}


# ---------------------------------------------------------------------------------------------- data
def pack(tar_path: Path, shared: Path = SHARED) -> None:
    """The raw cut and the GloVe file in one gzipped tar (JPEGs do not shrink: ~55 MB, under a 64 MiB carry)."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz", compresslevel=6) as tar:
        tar.add(shared / "mini-imagenet", arcname="mini-imagenet")
        tar.add(shared / GLOVE, arcname=str(GLOVE))
    print(f"{tar_path}: {tar_path.stat().st_size / 2**20:.1f} MiB")


def synthetic_cut(root: Path, per_class: int = 4) -> Path:
    """A tiny raw miniImageNet cut in the shared layout (84x84 JPEGs of coloured noise, 8-d 'GloVe')."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    mini, words = root / "mini-imagenet", ["apple", "boat", "cat", "dog", "egg", "fox", "goat", "hat", "ice", "jar"]
    (mini / "images").mkdir(parents=True, exist_ok=True)
    classes = {"train": words[:4], "val": words[4:7], "test": words[7:]}
    table = []
    for split, names in classes.items():
        rows = ["filename,label"]
        for name in names:
            wnid = f"n{words.index(name):08d}"
            table.append(f"{wnid} {words.index(name) + 1} {name}")
            colour = rng.uniform(0, 255, 3)
            for i in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 40, (84, 84, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(mini / "images" / f"{wnid}{i:08d}.jpg", quality=90)
                rows.append(f"{wnid}{i:08d}.jpg,{wnid}")
        (mini / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (mini / "mini_imagenet_class_label_dict3.txt").write_text("\n".join(table) + "\n")
    (root / GLOVE).parent.mkdir(parents=True, exist_ok=True)
    (root / GLOVE).write_text("".join(f"{w} " + " ".join(f"{v:.4f}" for v in rng.normal(size=8)) + "\n"
                                      for w in words))
    return root


def unpack(data: Path, raw: Path) -> None:
    """--data (a folder or a tar) -> ``raw`` holding mini-imagenet/ and glove/."""
    if data.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for part in ("mini-imagenet", "glove"):
            if not (raw / part).exists():
                (raw / part).symlink_to((data / part).resolve())
    else:
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data) as tar:
            tar.extractall(raw, filter="data")
    for needed in (raw / "mini-imagenet" / "train.csv", raw / GLOVE):
        if not needed.exists():
            raise SystemExit(f"{data}: no {needed.relative_to(raw)} in it")


# ---------------------------------------------------------------------------------------------- steps
def steps(args: argparse.Namespace, work: Path, out: Path) -> list[Step]:
    py, dry = args.python, args.dry
    device = ["--device", "cpu", "--threads", "1"] if dry else ["--device", "cuda"]
    data_root, runs = work / "data", work / "runs"
    pre_dir, weights = runs / "pre", runs / "pre" / "max_acc.pth"
    epochs = 1 if dry else args.pre_epochs
    step_size = max(1, round(RELEASE_STEP * epochs / RELEASE_EPOCHS))
    # the dry run checks the plumbing, not the backbone: Conv-4 there (ResNet-12 on a CPU is ~0.3 s an image)
    common = ["--dataset", "mini", "--model_type", "conv4" if dry else "res12", "--data_root", str(data_root), *device]
    env_check = ("import os, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', "
                 "torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', 'load', os.getloadavg(), "
                 "'cpus', os.cpu_count())")
    if dry:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_devices.py::test_kmeans_on_the_device_finds_the_planted_partition"]
        bench_meta = [py, "bench/meta.py", "--quick", *device, "--heads", "fusion"]
        bench_pre = [py, "bench/pretrain.py", "--quick", *device]
        pre_size = ["--pre_batch_size", "4", "--max_train_batches", "1", "--val_episodes", "2", "--way", "2",
                    "--val_query", "2", "--val_batch_size", "8", "--num_workers", "0"]
        meta_size = ["--max_epoch", "1", "--num_batch", "2", "--val_episodes", "2", "--test_episodes", "2",
                     "--inner_steps", "3", "--way", "2", "--train_query", "2", "--val_query", "2",
                     "--test_query", "2", "--kmeans_n_init", "1", "--shot", "1"]
        proto_size = ["--episodes", "2", "--way", "2", "--query", "2", "--shot", "1"]
        finetune_size = ["--max_epoch", "1", "--num_batch", "2", "--val_episodes", "2", "--train_query", "2",
                         "--val_query", "2"]
    else:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py",
                 "tests/test_inner_loop.py", "tests/test_batch_augment.py", "tests/test_kmeans.py",
                 "tests/test_heads.py"]
        bench_meta = [py, "bench/meta.py", *device, "--episodes", "600", "--episode_batch", "600",
                      "--train_episodes", "100", "--val_episodes", "100", "--carry_episodes", "20",
                      "--ref_episodes", "12", "--warmup", "4"]
        workers = max(1, (os.cpu_count() or 2) - 2)
        bench_pre = [py, "bench/pretrain.py", *device, "--batch_size", "128", "--steps", "10", "--warmup_steps", "3",
                     "--num_workers", str(workers), "--pipeline_images", "8192", "--repeats", "2",
                     "--pipeline_batch_sizes", "128", "512", "--epoch_images", "38400"]
        pre_size = ["--num_workers", str(min(8, workers))]
        meta_size = ["--test_episodes", str(args.test_episodes), "--shot", "1", "5"]
        proto_size = ["--episodes", str(args.test_episodes), "--shot", "1", "5"]
        # the release's 100 epochs x 100 episodes with StepLR(10, 0.5), shortened to 10 epochs with the same decay
        finetune_size = ["--max_epoch", "10", "--step_size", "1"]
    raw = work / "raw"
    glove = raw / GLOVE
    result = [
        Step("env", 30, [py, "-c", env_check]),
        Step("tests", 150, tests),
        Step("bench_meta", 100, bench_meta, jsonl=True),
        Step("bench_pretrain", 130, bench_pre, jsonl=True),
        Step("unpack", 60, [py, __file__, "--unpack-only", str(args.data), str(raw)]),
        Step("prepare", 150, [py, "-m", "dataloader.prepare", "mini", "--raw", str(raw / "mini-imagenet"),
                              "--glove", str(glove), "--out", str(data_root / "mini")], needs=["unpack"]),
        Step("pretrain", 60 + 4 * epochs, [py, "run_pre.py", *common, "--pre_max_epoch", str(epochs),
                                           "--pre_step_size", str(step_size), "--run_dir", str(pre_dir), *pre_size],
             needs=["prepare"]),
        Step("extract", 90, [py, "-m", "trainer.extract", *common, "--init_weights", str(weights), "--overwrite"],
             needs=["pretrain"]),
    ]
    scripts = {"fusion": "run_fusion.py", "concat": "run_concatenation.py"}
    for state in ("reset", "carry"):
        for head in ("fusion", "concat"):
            for setting in ("in", "tran"):
                name = f"meta_{state}_{head}_{setting}"
                limit = 60 if state == "reset" else 150
                result.append(Step(name, limit, [py, scripts[head], *common, "--inner_state", state, "--setting",
                                                 setting, "--run_dir", str(runs / name), *meta_size],
                                   needs=["extract"]))
        if state == "reset":   # the baselines between the fast and the slow meta runs
            result.append(Step("proto", 60, [py, "run_proto.py", *common, "--init_weights", str(weights),
                                             "--run_dir", str(runs / "proto"), *proto_size], needs=["extract"]))
            if has_flag("run_proto.py", "--finetune"):
                result.append(Step("proto_finetune", 150, [py, "run_proto.py", *common, "--finetune",
                                                           "--init_weights", str(weights), "--run_dir",
                                                           str(runs / "proto_finetune"), *proto_size,
                                                           *finetune_size],
                                   needs=["extract"]))
    if (REPO / "trainer" / "report.py").exists():
        # every result.json under runs/: a failed step leaves its folder without one instead of failing the table
        result.append(Step("report", 60, [py, "-m", "trainer.report", str(runs), "--out", str(out / "report")]))
    return result


def has_flag(script: str, flag: str) -> bool:
    """Whether ``script``'s source (or a trainer/proto*.py beside it) defines ``flag``; read, not run."""
    sources = [REPO / script, *(REPO / "trainer").glob("proto*.py")]
    return any(f'"{flag}"' in path.read_text() for path in sources if path.exists())


# ---------------------------------------------------------------------------------------------- running
def run_step(step: Step, limit: float, log, bench_path: Path) -> dict:
    """Run one step with a time limit, its output appended to the log; a dict for steps.jsonl."""
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(step.command)}\n")
    log.flush()
    started = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(step.command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=limit)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 15)
        try:
            stdout, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            stdout, _ = process.communicate()
        status = "timed_out"
    seconds = time.monotonic() - started
    log.write(stdout or "")
    if step.jsonl:
        with open(bench_path, "a") as f:
            f.writelines(line + "\n" for line in (stdout or "").splitlines() if line.startswith("{"))
    log.write(f"===== {step.name}: {status} (exit {process.returncode}) in {seconds:.1f} s\n")
    log.flush()
    return {"step": step.name, "status": status, "returncode": process.returncode, "seconds": round(seconds, 1),
            "limit": round(limit), "load_avg": list(os.getloadavg())}


def collect_runs(runs: Path, tar_path: Path) -> None:
    """Every run folder's small files (results, logs, configs; no checkpoints) into one tar."""
    if not runs.exists():
        return
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(runs.rglob("*")):
            if path.is_file() and path.stat().st_size <= SMALL_FILES and path.suffix != ".pth":
                tar.add(path, arcname=str(path.relative_to(runs.parent)))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--unpack-only"]:
        unpack(Path(argv[1]), Path(argv[2]))
        return 0
    args = parse_args(argv)
    if args.pack:
        pack(Path(args.pack))
        return 0
    started = time.monotonic()
    out = Path(args.out or REPO / "runs" / f"gpu_run-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or REPO / ".devcarry" / "gpu_work").resolve()
    if args.dry:
        args.budget = min(args.budget, 300)
        if not args.data:
            args.data = str(synthetic_cut(work / "synthetic"))
    if not args.data and not expand(args.only or ["recipe"]).isdisjoint(GROUPS["recipe"]):
        raise SystemExit("--data (or DATA) must name the miniImageNet cut for the recipe steps "
                         "(make it with --pack), or leave them out: --skip recipe")
    plan = steps(args, work, out)
    wanted = expand(args.only) if args.only else {step.name for step in plan}
    wanted -= expand(args.skip)
    succeeded, records = set(), []
    with open(out / "gpu_run.log", "a") as log, open(out / "steps.jsonl", "a") as summary:
        log.write(f"gpu_run: budget {args.budget} s, pre_epochs {args.pre_epochs}, dry {args.dry}, data "
                  f"{args.data}, work {work}, load {os.getloadavg()}\n")
        for step in plan:
            left = args.budget - (time.monotonic() - started)
            if step.name not in wanted:
                continue
            missing = [need for need in step.needs if need not in succeeded and need in wanted]
            limit = step.limit * (3 if args.dry else 1)
            if missing:
                record = {"step": step.name, "status": "skipped", "reason": f"{missing} did not succeed"}
            elif left < 15:
                record = {"step": step.name, "status": "skipped", "reason": f"budget: {left:.0f} s left"}
            else:
                record = run_step(step, min(limit, left - 5), log, out / "bench.jsonl")
                # a pretraining cut short by its limit still leaves its best epoch so far
                if record["status"] == "ok" or (step.name == "pretrain" and (work / "runs/pre/max_acc.pth").exists()):
                    succeeded.add(step.name)
            records.append(record)
            summary.write(json.dumps(record) + "\n")
            summary.flush()
            print(json.dumps(record), flush=True)
        collect_runs(work / "runs", out / "runs.tar.gz")
    failed = [r["step"] for r in records if r["status"] != "ok"]
    print(f"gpu_run: {len(records) - len(failed)} of {len(records)} steps ok in "
          f"{time.monotonic() - started:.0f} s; not ok: {failed or 'none'}; logs in {out}")
    if args.dry:
        shutil.rmtree(work / "synthetic", ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
