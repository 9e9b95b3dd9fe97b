"""One table of every result in some run folders: ``python -m trainer.report RUN_DIR [RUN_DIR ...] [--out FOLDER]``.

Every ``result.json`` under the given folders (recursively) becomes one table of test accuracies, mean +- 95%
CI, printed as Markdown; ``results.csv`` (one line per cell, every setting in its own column) and
``results.png`` (bars with the CIs as error bars) go to ``--out`` (default: the first RUN_DIR)::

    python -m trainer.report runs/fusion_mini_res12-20250101-120000 runs/proto_mini_res12-20250101-110000

The result files it reads, as their writers leave them:

- the meta stage (:meth:`trainer.meta.MetaRun.test`): ``test_acc``, ``test_ci95``, ``head`` (fusion / concat),
  ``shot`` and the settings (``setting``, ``inner_state``, ``metric``, ``lamda``, ...);
- the ProtoNet baseline (:func:`trainer.evaluate.proto_baseline`, ``run_proto.py``): ``"method": "protonet"``,
  one file for several shots (``"shots": {"1": {"acc", "ci95"}, ...}``), ``episodes`` and ``query``;
- the release's fine-tuned ProtoNet: ``"method": "protonet_finetune"``, ``test_acc``, ``test_ci95``, ``shot``;
  any other ``method`` with those keys is read the same way and listed under its own name.

Which runs share a row. Runs are never averaged across settings: a row is keyed by *every* setting the run
recorded, in its ``result.json`` and in the ``config.json`` that :class:`trainer.runs.RunFolder` writes beside
it (so two meta runs trained for a different number of epochs stay apart even though their result files look
alike). Only the keys of :data:`NOT_SETTINGS` are left out of the key: the measurements, the seed, and where a
run happened to be (paths, device, threads, git commit, batch sizes that only change the speed). A key this
module does not know is therefore a setting, and keeps runs apart. The columns show method, dataset,
backbone, way, setting, inner state and test episodes; when two rows agree on all of those, an "other
settings" column names the keys they differ in.

How runs with identical settings combine (e.g. several seeds): the cell shows the mean of the runs'
accuracies and ``(n=K)``; its 95% CI is that of the mean over the K runs, ``t(0.975, K-1) * std / sqrt(K)``
with the sample standard deviation of the runs' accuracies (Student's t: with a handful of seeds 1.96 would
be far too narrow), but never narrower than the CI the runs' own test episodes give the mean,
``sqrt(sum ci95_i^2) / K``. A single run shows its own CI over its test episodes. Two runs with identical
settings *and* the same seed are not independent (the same test episodes): the first one (in path order) is
kept and a warning names both.

A ``result.json`` (or its ``config.json``) that is not valid JSON, lacks a needed key or holds an impossible
accuracy stops the report with an error naming the file: result files are written atomically, so a broken
one is a real problem, and a table silently missing a run would look complete.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from utils.io import InputError, atomic_write
from utils.runtime import resolve_path

RESULT_NAME = "result.json"
CONFIG_NAME = "config.json"

# Method id -> name in the table; the table lists methods in this order, then any other method by name.
METHOD_NAMES = {
    "protonet": "ProtoNet (features)",
    "protonet_finetune": "ProtoNet (fine-tuned)",
    "tasnet_fusion": "TasNet fusion",
    "tasnet_concat": "TasNet concat",
}

# Keys that are not settings: measurements, the seed (what combined runs may differ in), and provenance that
# does not change what was measured. Everything else recorded by a run keys its row.
NOT_SETTINGS = frozenset({
    # measurements
    "test_acc", "test_ci95", "acc", "ci95", "shots", "val_best_acc", "val_best_epoch", "episodes_per_s",
    # the seed
    "seed",
    # provenance: where the run, its data and its checkpoints were, and on what
    "weights", "features", "init_weights", "eval_weights", "data_root", "run_dir", "device", "threads",
    "git_commit", "command", "started", "resume", "deterministic",
    # batch sizes of feature extraction and of gathering episodes: the speed, not the result
    "extract_batch_size", "batch_size", "episode_batch",
})
# The meta stage accepts the pretraining flags only so that old command lines parse, and ignores them.
META_IGNORED = frozenset({"pre_max_epoch", "pre_batch_size", "pre_lr", "pre_gamma", "pre_step_size",
                          "pre_custom_momentum", "pre_custom_weight_decay"})

# The table's columns before the shots: (setting key, header).
COLUMNS = (("method", "method"), ("dataset", "dataset"), ("model_type", "backbone"), ("way", "way"),
           ("setting", "setting"), ("inner_state", "inner state"), ("test_episodes", "test episodes"))
# results.csv: these first, then the cell's figures, then every other setting (sorted), then the files.
CSV_FIRST = ("method_name", "method", "dataset", "model_type", "way", "shot", "setting", "inner_state",
             "test_episodes")
CSV_FIGURES = ("acc", "ci95", "runs", "seeds", "run_accs")

def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class RunResult:
    """One run's test accuracy at one shot, with every setting that keys its row."""

    path: Path
    settings: dict  # includes "method" and "shot"
    seed: object
    acc: float
    ci95: float


@dataclass
class Cell:
    """The runs with identical settings (one per seed) at one shot, combined as the module docstring says."""

    runs: list[RunResult]
    acc: float = field(init=False)
    ci95: float = field(init=False)

    def __post_init__(self):
        accs = [run.acc for run in self.runs]
        n = len(accs)
        self.acc = sum(accs) / n
        if n == 1:
            self.ci95 = self.runs[0].ci95
        else:
            sample_std = math.sqrt(sum((a - self.acc) ** 2 for a in accs) / (n - 1))
            across_runs = t975(n - 1) * sample_std / math.sqrt(n)
            within_episodes = math.sqrt(sum(run.ci95 ** 2 for run in self.runs)) / n
            self.ci95 = max(across_runs, within_episodes)


@dataclass
class Row:
    """One line of the table: the settings shared by its cells (all but the shot) and a cell per shot."""

    settings: dict
    cells: dict[int, Cell] = field(default_factory=dict)
    distinct: dict = field(default_factory=dict)  # settings that tell it from rows with the same columns

    @property
    def method_name(self) -> str:
        method = self.settings["method"]
        return METHOD_NAMES.get(method, method)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_results(folders: Sequence[str | Path]) -> list[Path]:
    """Every ``result.json`` under ``folders`` (recursively; a folder given twice counts once), sorted."""
    found = set()
    for folder in folders:
        path = resolve_path(folder)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(RESULT_NAME) if p.is_file())
        else:
            raise InputError(f"{path}: no such folder.")
    if not found:
        raise InputError(f"no {RESULT_NAME} found under {', '.join(str(resolve_path(f)) for f in folders)}; "
                         f"pass the run folders of run_proto.py, run_fusion.py, run_concatenation.py or "
                         f"run_demo.py.")
    return sorted(found)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, or an :class:`InputError` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a JSON {type(data).__name__}, not an object of results.")
    return data


def _require(path: Path, data: dict, keys: Iterable[str], kind: str) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise InputError(f"{path}: a {kind} result without {', '.join(missing)}; re-create it with the stage "
                         f"that wrote it.")


def _accuracy(path: Path, where: str, acc, ci95) -> tuple[float, float]:
    """``acc`` and ``ci95`` as floats; an accuracy that is no fraction (a diverged run) is an error."""
    try:
        acc, ci95 = float(acc), float(ci95)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {where}: accuracy {acc!r} +- {ci95!r} is not a number.") from None
    if not (math.isfinite(acc) and 0.0 <= acc <= 1.0 and math.isfinite(ci95) and ci95 >= 0.0):
        raise InputError(f"{path}: {where}: accuracy {acc} +- {ci95} is not a finite fraction with a CI >= 0; "
                         f"see that run's log.")
    return acc, ci95


def _shot(path: Path, value) -> int:
    """A shot as a positive int; result files hold ints, run_proto.py's ``shots`` keys are strings."""
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise InputError(f"{path}: shot {value!r} is not a positive whole number.")
    return int(text)


def load_result(path: Path) -> list[RunResult]:
    """The runs of one ``result.json`` (one per shot), its settings merged over those of its ``config.json``."""
    data = read_json(path)
    config_path = path.parent / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else {}
    method = data.get("method")
    if method is None and "head" in data:
        _require(path, data, ("test_acc", "test_ci95", "test_episodes", "dataset", "model_type", "head", "shot",
                              "way"), "meta-stage")
        method = f"tasnet_{data['head']}"
        ignored = NOT_SETTINGS | META_IGNORED | {"head"}
    elif method == "protonet":
        _require(path, data, ("shots", "dataset", "model_type", "way", "episodes"), "ProtoNet baseline")
        ignored = NOT_SETTINGS
    elif isinstance(method, str):
        _require(path, data, ("test_acc", "test_ci95", "test_episodes", "dataset", "model_type", "shot", "way"),
                 f"{method!r}")
        ignored = NOT_SETTINGS
    else:
        raise InputError(f"{path}: neither a meta-stage result (no 'head') nor one with a 'method'; it holds "
                         f"{sorted(data)[:12]}.")

    settings = {key: value for key, value in config.items() if key not in ignored}
    settings.update((key, value) for key, value in data.items() if key not in ignored)
    settings["method"] = method
    if method == "protonet":
        # run_proto.py's names for what the other stages call test_episodes and test_query
        settings["test_episodes"] = settings.pop("episodes")
        if "query" in settings:
            settings["test_query"] = settings.pop("query")
        if not isinstance(data["shots"], dict) or not data["shots"]:
            raise InputError(f"{path}: 'shots' should map each shot to {{'acc', 'ci95'}}, got {data['shots']!r}.")
        per_shot = []
        for shot, cell in data["shots"].items():
            if not isinstance(cell, dict) or "acc" not in cell or "ci95" not in cell:
                raise InputError(f"{path}: shots[{shot!r}] should hold 'acc' and 'ci95', got {cell!r}.")
            per_shot.append((_shot(path, shot), *_accuracy(path, f"{shot}-shot", cell["acc"], cell["ci95"])))
    else:
        shot = _shot(path, data["shot"])
        per_shot = [(shot, *_accuracy(path, f"{shot}-shot", data["test_acc"], data["test_ci95"]))]
    return [RunResult(path, {**settings, "shot": shot}, data.get("seed"), acc, ci95)
            for shot, acc, ci95 in per_shot]


def _key(settings: dict) -> tuple:
    """A hashable key of ``settings`` (lists and dicts compared by content)."""
    return tuple(sorted((key, json.dumps(value, sort_keys=True, default=str)) for key, value in settings.items()))


def _sort_value(value) -> tuple:
    """Numbers before strings before missing values, so that 100 episodes sort before 600 and 1000."""
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def build_rows(runs: Sequence[RunResult]) -> list[Row]:
    """Group ``runs`` into rows (identical settings but the shot) and cells (identical settings, one per seed)."""
    by_cell: dict[tuple, list[RunResult]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        same = by_cell.setdefault(_key(run.settings), [])
        twin = next((kept for kept in same if kept.seed == run.seed), None)
        if twin is not None:
            warn(f"{run.path}: the same settings and seed ({run.seed}) as {twin.path}, so not an independent run; "
                 f"only {twin.path} is counted.")
            continue
        same.append(run)
    rows: dict[tuple, Row] = {}
    for cell_runs in by_cell.values():
        settings = {key: value for key, value in cell_runs[0].settings.items() if key != "shot"}
        row = rows.setdefault(_key(settings), Row(settings))
        row.cells[cell_runs[0].settings["shot"]] = Cell(cell_runs)

    # rows that agree on every column: name the settings they differ in
    by_columns: dict[tuple, list[Row]] = {}
    for row in rows.values():
        by_columns.setdefault(_key({key: row.settings.get(key) for key, _ in COLUMNS}), []).append(row)
    for group in by_columns.values():
        if len(group) > 1:
            keys = set().union(*(row.settings for row in group))
            differing = sorted(key for key in keys if len({_key({key: row.settings.get(key)}) for row in group}) > 1)
            for row in group:
                row.distinct = {key: row.settings.get(key) for key in differing}

    order = list(METHOD_NAMES)

    def sort_key(row: Row) -> tuple:
        s = row.settings
        method_rank = order.index(s["method"]) if s["method"] in order else len(order)
        return (_sort_value(s.get("dataset")), _sort_value(s.get("model_type")), _sort_value(s.get("way")),
                method_rank, s["method"], _sort_value(s.get("setting")), _sort_value(s.get("inner_state")),
                _sort_value(s.get("test_episodes")), _key(row.distinct))

    return sorted(rows.values(), key=sort_key)


def collect(folders: Sequence[str | Path]) -> list[Row]:
    """The rows of every ``result.json`` under ``folders``."""
    runs = [run for path in find_results(folders) for run in load_result(path)]
    return build_rows(runs)


def shots_of(rows: Sequence[Row]) -> list[int]:
    return sorted({shot for row in rows for shot in row.cells})


def _text(value) -> str:
    return "-" if value is None else str(value)


def format_cell(cell: Cell | None) -> str:
    """``61.23 +- 0.80`` (percent), with ``(n=K)`` when K runs are combined; ``-`` when there is none."""
    if cell is None:
        return "-"
    runs = f" (n={len(cell.runs)})" if len(cell.runs) > 1 else ""
    return f"{100 * cell.acc:.2f} +- {100 * cell.ci95:.2f}{runs}"


def other_settings(row: Row) -> str:
    return ", ".join(f"{key}={_text(value)}" for key, value in row.distinct.items())


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown: a line per row, a column per shot, then a line on how to read the cells."""
    shots = shots_of(rows)
    with_other = any(row.distinct for row in rows)
    header = [title for _, title in COLUMNS] + (["other settings"] if with_other else [])
    header += [f"{shot}-shot" for shot in shots]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.method_name] + [_text(row.settings.get(key)) for key, _ in COLUMNS[1:]]
        cells += [other_settings(row)] if with_other else []
        cells += [format_cell(row.cells.get(shot)) for shot in shots]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy in %, mean +- 95% CI over the test episodes; (n=K): the mean of K runs with the "
                  "same settings (different seeds) and the 95% CI of that mean."]
    return "\n".join(lines)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """``results.csv``: one line per cell; accuracies as fractions; every setting in its own column."""
    others = sorted(set().union(*(row.settings for row in rows)) - set(CSV_FIRST))
    fields = list(CSV_FIRST) + list(CSV_FIGURES) + others + ["files"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        for shot, cell in sorted(row.cells.items()):
            line = {key: _csv_value(value) for key, value in row.settings.items()}
            line.update(method_name=row.method_name, shot=shot, acc=repr(cell.acc), ci95=repr(cell.ci95),
                        runs=len(cell.runs), seeds=" ".join(_text(run.seed) for run in cell.runs),
                        run_accs=" ".join(repr(run.acc) for run in cell.runs),
                        files=";".join(str(run.path) for run in cell.runs))
            writer.writerow(line)
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())


def row_label(row: Row) -> str:
    """The row's name in the plot: method, then the columns that are set, then what tells it apart."""
    s = row.settings
    parts = [row.method_name, f"{_text(s.get('dataset'))}/{_text(s.get('model_type'))} {_text(s.get('way'))}-way"]
    parts += [str(s[key]) for key in ("setting", "inner_state") if s.get(key) is not None]
    parts.append(f"{_text(s.get('test_episodes'))} ep")
    if row.distinct:
        parts.append(other_settings(row))
    return ", ".join(parts)


def plot(rows: Sequence[Row], path: Path) -> None:
    """``results.png``: a panel per shot, a horizontal bar per row, the 95% CIs as error bars."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    shots = shots_of(rows)
    positions = list(range(len(rows)))[::-1]  # first row on top
    fig, axes = plt.subplots(1, len(shots), figsize=(3 + 4 * len(shots), 1.5 + 0.4 * len(rows)), sharey=True,
                             squeeze=False)
    methods = list(dict.fromkeys(row.settings["method"] for row in rows))
    colours = [plt.get_cmap("tab10")(methods.index(row.settings["method"]) % 10) for row in rows]
    for ax, shot in zip(axes[0], shots):
        cells = [row.cells.get(shot) for row in rows]
        ax.barh(positions, [100 * c.acc if c else float("nan") for c in cells],
                xerr=[100 * c.ci95 if c else 0.0 for c in cells], capsize=3, color=colours, alpha=0.85)
        ax.set_title(f"{shot}-shot")
        ax.set_xlabel("test accuracy (%), 95% CI")
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels([row_label(row) for row in rows], fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def report(folders: Sequence[str | Path], out: str | Path | None = None) -> tuple[list[Row], str]:
    """Collect the results under ``folders``; write results.csv and results.png into ``out`` (default: the
    first folder). Returns the rows and the Markdown table (the caller writes it where it belongs: the command
    into results.md, the demo into its results.md with its notes)."""
    rows = collect(folders)
    out_dir = resolve_path(out if out is not None else folders[0])
    if out_dir.is_file():
        raise InputError(f"--out {out_dir}: a file, not a folder; pass a folder for results.csv and results.png.")
    write_csv(rows, out_dir / "results.csv")
    plot(rows, out_dir / "results.png")
    return rows, markdown(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="folders searched recursively for result.json (relative paths are taken from the "
                             "repository); a result.json file itself is accepted too")
    parser.add_argument("--out", default=None,
                        help="folder for results.md, results.csv and results.png (default: the first RUN_DIR)")
    return parser


def report_command(args: argparse.Namespace) -> None:
    """``python -m trainer.report``: print the table, write it as results.md beside the CSV and the plot."""
    _, table = report(args.run_dirs, args.out)
    out_dir = resolve_path(args.out if args.out is not None else args.run_dirs[0])
    with atomic_write(out_dir / "results.md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwrote results.md, results.csv and results.png into {out_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    from utils.cli import run_cli
    run_cli(report_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
