"""A GPU machine's checks in one command: the CUDA tests, the two benches, then the release recipe on the
miniImageNet cut, each step under its own time limit, every step's output logged into one folder.

    python bench/gpu_run.py --pack mini-cut.tar.gz --source ../shared/data    # the cut + GloVe in one tar
    python bench/gpu_run.py --data mini-cut.tar.gz --out logs/h100           # on a machine with one GPU
    python bench/gpu_run.py --data mini-cut.tar.gz --out logs --only recipe --pre_epochs 40 --budget 1800
    python bench/gpu_run.py --dry --out logs/dry                             # on a CPU: tiny sizes, a synthetic cut

Relative paths in the flags are taken from the repository. Steps, most valuable first (``--only`` / ``--skip``
take step names or the groups tests, bench, recipe, meta):

1. ``env``: the card, torch and CUDA versions, the load average.
2. ``tests``: ``tests/test_devices.py`` (augmentation, inner loop, k-means and heads on cuda against the CPU) and
   the inner-loop, augmentation, k-means and head test files.
3. ``bench_meta``, ``bench_pretrain``: ``bench/meta.py`` (600 reset test episodes as one batch) and
   ``bench/pretrain.py`` (batch 128, a miniImageNet-sized epoch); their JSON lines go to ``bench.jsonl``.
4. ``unpack`` (when ``--data`` is a tar), ``prepare``: ``--data`` holds ``mini-imagenet/`` and
   ``glove/glove.6B.50d.subset.txt`` (the layout of ``$TASNET_DATA``) -> ``python -m dataloader.prepare``.
5. ``pretrain``: ``run_pre.py`` ResNet-12 for ``--pre_epochs`` (the StepLR period scaled as 30 of 110). Cut
   short by its limit, its best epoch so far (``max_acc.pth``) is what the next steps use.
6. ``extract``: ``python -m trainer.extract`` of that backbone.
7. ``meta_*``: ``run_fusion.py`` and ``run_concatenation.py``, ``--shot 1 5``, reset mode (fast) for
   ``--setting in`` and ``tran``, then ``proto`` and ``proto_finetune`` (``run_proto.py``), then carry mode.
8. ``report``: ``python -m trainer.report`` of every run into ``<out>/report``.

A step that fails or runs past its limit costs only its own figures and those of the steps that need it.
``--budget`` bounds the whole run: a step's limit is cut to what is left, and steps that no longer fit are skipped.
``--out`` receives ``gpu_run.log`` (every step's output), ``steps.jsonl`` (per step: status, exit code, seconds,
limit), ``bench.jsonl``, ``runs.tar.gz`` (the runs' small files: results, logs, configs) and ``report/``;
prepared data, checkpoints and run folders stay in ``--work``.
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

REPO = Path(__file__).resolve().parent.parent  # relative paths in the flags are taken from here
GLOVE = "glove/glove.6B.50d.subset.txt"
SCRIPTS = {"fusion": "run_fusion.py", "concat": "run_concatenation.py"}
GROUPS = {"tests": ["env", "tests"], "bench": ["bench_meta", "bench_pretrain"],
          "meta": [f"meta_{state}_{head}_{setting}" for state in ("reset", "carry") for head in SCRIPTS
                   for setting in ("in", "tran")] + ["proto", "proto_finetune"]}
GROUPS["recipe"] = ["unpack", "prepare", "pretrain", "extract", *GROUPS["meta"], "report"]
RELEASE_EPOCHS, RELEASE_STEP = 110, 30
SMALL_FILES = 1 << 20  # run-folder files up to this size go into runs.tar.gz (no checkpoints)
ENV_CHECK = ("import os, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else 'none', 'load', os.getloadavg(), "
             "'cpus', os.cpu_count())")


@dataclass
class Step:
    name: str
    limit: int                                        # seconds
    command: list[str]
    needs: list[str] = field(default_factory=list)    # steps that must have succeeded first
    jsonl: bool = False                               # stdout is a bench's JSON line: keep it in bench.jsonl


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data", default="", help="the miniImageNet cut: a folder or a .tar / .tar.gz holding mini-imagenet/ and "
                                   "glove/ (with --dry, default: a synthetic cut made in --work)")
    add("--out", default="", help="folder for the logs, bench.jsonl, runs.tar.gz and report/ "
                                  "(default runs/gpu_run-<time>)")
    add("--work", default="runs/gpu_work", help="prepared data, checkpoints and run folders")
    add("--budget", type=int, default=0, help="seconds for the whole run; steps that no longer fit are skipped "
                                              "(0: no bound, only each step's own limit)")
    add("--pre_epochs", type=int, default=RELEASE_EPOCHS, help="pretraining epochs (110: the release)")
    add("--test_episodes", type=int, default=600, help="test episodes of every meta run")
    add("--only", nargs="+", default=[], help="run only these steps or groups (tests, bench, recipe, meta)")
    add("--skip", nargs="+", default=[], help="skip these steps or groups")
    add("--dry", action="store_true",
        help="tiny sizes on the CPU (--device cpu --threads 1, Conv-4): checks that every step runs")
    add("--python", default=sys.executable, help="the interpreter for every step")
    add("--pack", metavar="TAR", default="", help="write the --data tar from --source and exit")
    add("--source", default=os.environ.get("TASNET_DATA", str(REPO.parent / "shared" / "data")),
        help="--pack: the folder holding mini-imagenet/ and glove/ (default $TASNET_DATA, else ../shared/data)")
    return parser.parse_args(argv)


def expand(names: list[str]) -> set[str]:
    return {step for name in names for step in GROUPS.get(name, [name])}


def pack(tar_path: Path, source: Path) -> None:
    """The raw cut and the GloVe file in one gzipped tar."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz", compresslevel=6) as tar:
        tar.add(source / "mini-imagenet", arcname="mini-imagenet")
        tar.add(source / GLOVE, arcname=GLOVE)
    print(f"{tar_path}: {tar_path.stat().st_size / 2**20:.1f} MiB")


def synthetic_cut(root: Path, per_class: int = 4) -> Path:
    """A tiny raw miniImageNet cut in the layout of ``--data`` (84x84 JPEGs of coloured noise, 8-d 'GloVe')."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    mini, words = root / "mini-imagenet", ["apple", "boat", "cat", "dog", "egg", "fox", "goat", "hat", "ice", "jar"]
    (mini / "images").mkdir(parents=True, exist_ok=True)
    table = []
    for split, names in {"train": words[:4], "val": words[4:7], "test": words[7:]}.items():
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


def steps(args: argparse.Namespace, data: Path, work: Path, out: Path) -> list[Step]:
    """Every step in order, with its limit and the steps it needs."""
    py = args.python
    device = ["--device", "cpu", "--threads", "1"] if args.dry else ["--device", "cuda"]
    data_root, runs = work / "data", work / "runs"
    weights = runs / "pre" / "max_acc.pth"
    epochs = 1 if args.dry else args.pre_epochs
    step_size = max(1, round(RELEASE_STEP * epochs / RELEASE_EPOCHS))
    # the dry run checks the plumbing, not the backbone: Conv-4 there (ResNet-12 on a CPU is ~0.3 s an image)
    common = ["--dataset", "mini", "--model_type", "conv4" if args.dry else "res12", "--data_root", str(data_root),
              *device]
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if args.dry:
        tests = [*pytest, "tests/test_devices.py::test_kmeans_on_the_device_finds_the_planted_partition"]
        bench_meta = ["--quick", "--heads", "fusion"]
        bench_pre = ["--quick"]
        pre_size = ["--pre_batch_size", "4", "--max_train_batches", "1", "--val_episodes", "2", "--way", "2",
                    "--val_query", "2", "--val_batch_size", "8", "--num_workers", "0"]
        meta_size = ["--max_epoch", "1", "--num_batch", "2", "--val_episodes", "2", "--test_episodes", "2",
                     "--inner_steps", "3", "--way", "2", "--train_query", "2", "--val_query", "2",
                     "--test_query", "2", "--kmeans_n_init", "1", "--shot", "1"]
        proto_size = ["--episodes", "2", "--way", "2", "--query", "2", "--shot", "1"]
        finetune_size = ["--max_epoch", "1", "--num_batch", "2", "--val_episodes", "2", "--train_query", "2",
                         "--val_query", "2"]
    else:
        tests = [*pytest, "tests/test_devices.py", "tests/test_inner_loop.py", "tests/test_batch_augment.py",
                 "tests/test_kmeans.py", "tests/test_heads.py"]
        bench_meta = ["--episodes", "600", "--episode_batch", "600", "--train_episodes", "100", "--val_episodes",
                      "100", "--carry_episodes", "20", "--ref_episodes", "12", "--warmup", "4"]
        workers = max(1, (os.cpu_count() or 2) - 2)
        bench_pre = ["--batch_size", "128", "--steps", "10", "--warmup_steps", "3", "--num_workers", str(workers),
                     "--pipeline_images", "8192", "--repeats", "2", "--pipeline_batch_sizes", "128", "512",
                     "--epoch_images", "38400"]
        pre_size = ["--num_workers", str(min(8, workers))]
        meta_size = ["--test_episodes", str(args.test_episodes), "--shot", "1", "5"]
        proto_size = ["--episodes", str(args.test_episodes), "--shot", "1", "5"]
        # the release's 100 epochs x 100 episodes with StepLR(10, 0.5), shortened to 10 epochs with the same decay
        finetune_size = ["--max_epoch", "10", "--step_size", "1"]

    plan = [Step("env", 30, [py, "-c", ENV_CHECK]),
            Step("tests", 150, tests),
            Step("bench_meta", 100, [py, "bench/meta.py", *device, *bench_meta], jsonl=True),
            Step("bench_pretrain", 130, [py, "bench/pretrain.py", *device, *bench_pre], jsonl=True)]
    raw, unpacked = (work / "raw", ["unpack"]) if data.is_file() else (data, [])
    if unpacked:
        plan.append(Step("unpack", 60, [py, "-c", "import sys, tarfile; tarfile.open(sys.argv[1]).extractall("
                                                  "sys.argv[2], filter='data')", str(data), str(raw)]))
    plan += [
        Step("prepare", 150, [py, "-m", "dataloader.prepare", "mini", "--raw", str(raw / "mini-imagenet"), "--glove",
                              str(raw / GLOVE), "--out", str(data_root / "mini")], needs=unpacked),
        Step("pretrain", 60 + 4 * epochs, [py, "run_pre.py", *common, "--pre_max_epoch", str(epochs), "--pre_step_size",
                                           str(step_size), "--run_dir", str(runs / "pre"), *pre_size],
             needs=["prepare"]),
        Step("extract", 90, [py, "-m", "trainer.extract", *common, "--init_weights", str(weights), "--overwrite"],
             needs=["pretrain"])]

    def meta(state: str, limit: int) -> list[Step]:
        return [Step(f"meta_{state}_{head}_{setting}", limit,
                     [py, script, *common, "--inner_state", state, "--setting", setting, "--run_dir",
                      str(runs / f"meta_{state}_{head}_{setting}"), *meta_size], needs=["extract"])
                for head, script in SCRIPTS.items() for setting in ("in", "tran")]

    # the baselines between the fast (reset) and the slow (carry) meta runs
    plan += meta("reset", 60) + [
        Step("proto", 60, [py, "run_proto.py", *common, "--init_weights", str(weights), "--run_dir",
                           str(runs / "proto"), *proto_size], needs=["extract"]),
        Step("proto_finetune", 150, [py, "run_proto.py", *common, "--finetune", "--init_weights", str(weights),
                                     "--run_dir", str(runs / "proto_finetune"), *proto_size, *finetune_size],
             needs=["extract"])] + meta("carry", 150)
    # every result.json under runs/: a failed step leaves its folder without one instead of failing the table
    plan.append(Step("report", 60, [py, "-m", "trainer.report", str(runs), "--out", str(out / "report")]))
    return plan


def run_step(step: Step, limit: float, log, bench_path: Path) -> dict:
    """Run one step with a time limit, its output appended to the log; a dict for steps.jsonl."""
    log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(step.command)}\n")
    log.flush()
    started = time.monotonic()
    process = subprocess.Popen(step.command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=limit)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 15)  # the whole group: DataLoader workers too
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack:
        pack(REPO / args.pack, REPO / args.source)
        return 0
    wanted = expand(args.only or list(GROUPS)) - expand(args.skip)
    if not (args.data or args.dry) and wanted & set(GROUPS["recipe"]):
        raise SystemExit("--data must name the miniImageNet cut for the recipe steps (make it with --pack), or "
                         "leave them out: --skip recipe")
    started = time.monotonic()
    out = REPO / (args.out or f"runs/gpu_run-{time.strftime('%Y%m%d-%H%M%S')}")
    work = REPO / args.work
    out.mkdir(parents=True, exist_ok=True)
    synthetic = work / "synthetic"
    if args.dry and not args.data:  # a tar, so that the dry run unpacks like a real one
        pack(work / "synthetic.tar.gz", synthetic_cut(synthetic))
        args.data = str(work / "synthetic.tar.gz")
    plan = steps(args, REPO / args.data, work, out)
    budget = args.budget or float("inf")
    succeeded, records = set(), []
    with open(out / "gpu_run.log", "a") as log, open(out / "steps.jsonl", "a") as summary:
        log.write(f"gpu_run: budget {args.budget} s, pre_epochs {args.pre_epochs}, dry {args.dry}, data "
                  f"{args.data}, work {work}, load {os.getloadavg()}\n")
        for step in (step for step in plan if step.name in wanted):
            left = budget - (time.monotonic() - started)
            missing = [need for need in step.needs if need not in succeeded and need in wanted]
            if missing:
                record = {"step": step.name, "status": "skipped", "reason": f"{missing} did not succeed"}
            elif left < 15:
                record = {"step": step.name, "status": "skipped", "reason": f"budget: {left:.0f} s left"}
            else:
                limit = step.limit * (3 if args.dry else 1)
                record = run_step(step, min(limit, left - 5), log, out / "bench.jsonl")
                # a pretraining cut short by its limit still leaves its best epoch so far
                if record["status"] == "ok" or (step.name == "pretrain" and (work / "runs/pre/max_acc.pth").exists()):
                    succeeded.add(step.name)
            records.append(record)
            summary.write(json.dumps(record) + "\n")
            summary.flush()
            print(json.dumps(record), flush=True)
    if (work / "runs").exists():
        with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
            for path in sorted((work / "runs").rglob("*")):
                if path.is_file() and path.stat().st_size <= SMALL_FILES and path.suffix != ".pth":
                    tar.add(path, arcname=str(path.relative_to(work)))
    if args.dry:
        shutil.rmtree(synthetic, ignore_errors=True)
        (work / "synthetic.tar.gz").unlink(missing_ok=True)
    failed = [record["step"] for record in records if record["status"] != "ok"]
    print(f"gpu_run: {len(records) - len(failed)} of {len(records)} steps ok in {time.monotonic() - started:.0f} s; "
          f"not ok: {failed or 'none'}; logs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
