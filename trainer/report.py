"""One table of every result in some run folders::

    python -m trainer.report RUN_DIR [RUN_DIR ...] [--out FOLDER]

Every ``result.json`` under the folders gives rows of test accuracy (mean +- 95% CI), printed and written into
``--out`` (default: the first RUN_DIR) as results.md, results.csv and results.png; a meta run that recorded both
test protocols (``test_acc_reset``, ``test_acc_carry``) gets a column and a bar for each.

A row is keyed by every setting in ``result.json`` and the ``config.json`` beside it but :data:`NOT_SETTINGS`, so
runs are never averaged across settings; rows that look alike get an "other settings" column. Runs with identical
settings (seeds; the same seed twice counts once) share a cell: their mean and the Student-t 95% CI of that mean,
never narrower than their episodes' combined CI. A bad ``result.json`` is an error naming the file.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils.io import InputError, atomic_write
from utils.runtime import resolve_path

# Method id -> name in the table; the table lists methods in this order, then any other method by name.
METHOD_NAMES = {"protonet": "ProtoNet (features)", "protonet_finetune": "ProtoNet (fine-tuned)",
                "tasnet_fusion": "TasNet fusion", "tasnet_concat": "TasNet concat"}
NOT_SETTINGS = frozenset({  # measurements, the seed, provenance, and batch sizes that only change the speed
    "test_acc", "test_ci95", "acc", "ci95", "shots", "val_best_acc", "val_best_epoch", "episodes_per_s",
    "test_acc_reset", "test_ci95_reset", "test_acc_carry", "test_ci95_carry", "carry_block_acc", "lamda_val_acc",
    "seed", "weights", "features", "init_weights", "eval_weights", "data_root", "run_dir", "device", "threads",
    "git_commit", "command", "started", "resume", "deterministic", "extract_batch_size", "batch_size",
    "episode_batch"})
# The table's columns before the accuracies: (setting key, header).
COLUMNS = (("method", "method"), ("dataset", "dataset"), ("model_type", "backbone"), ("way", "way"),
           ("setting", "setting"), ("inner_state", "inner state"), ("test_episodes", "test episodes"))
# Figure -> suffix of its keys: the run's own test, and the two test protocols where a meta run recorded both.
FIGURES = {"test": "", "reset": "_reset", "carry": "_carry"}


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class RunResult:
    """One run at one shot: the settings that key its row (the method among them), figure -> (acc, ci95)."""

    path: Path
    settings: dict
    shot: int
    seed: object
    figures: dict


@dataclass
class Cell:
    """One figure (the test or a protocol) of the runs with identical settings, one per seed, combined."""

    figure: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def acc(self) -> float:
        return sum(run.figures[self.figure][0] for run in self.runs) / len(self.runs)

    @property
    def ci95(self) -> float:
        """Student's t over the seeds (1.96 is far too narrow for a few), never below the episodes' own CI."""
        accs, cis = zip(*(run.figures[self.figure] for run in self.runs))
        n = len(accs)
        if n == 1:
            return cis[0]
        sample_std = math.sqrt(sum((acc - self.acc) ** 2 for acc in accs) / (n - 1))
        return max(t975(n - 1) * sample_std / math.sqrt(n), math.sqrt(sum(ci ** 2 for ci in cis)) / n)

    def text(self) -> str:
        """``61.23 +- 0.80`` (percent), with ``(n=K)`` when K runs are combined."""
        n = f" (n={len(self.runs)})" if len(self.runs) > 1 else ""
        return f"{100 * self.acc:.2f} +- {100 * self.ci95:.2f}{n}"


@dataclass
class Row:
    """One line of the table: the settings its runs share (the method among them), a cell per (shot, figure)."""

    settings: dict
    figures: dict[tuple[int, str], Cell] = field(default_factory=dict)
    distinct: dict = field(default_factory=dict)  # the settings that tell it from rows with the same columns

    @property
    def cells(self) -> dict[int, Cell]:
        """Shot -> the cell of the runs' own test."""
        return {shot: cell for (shot, figure), cell in self.figures.items() if figure == "test"}

    @property
    def method_name(self) -> str:
        return METHOD_NAMES.get(self.settings["method"], self.settings["method"])

    def columns(self) -> list[str]:
        """The texts of the columns before the accuracies; a lamda chosen by ``--lamda auto`` joins the setting."""
        texts = {key: _text(self.settings.get(key)) for key, _ in COLUMNS} | {"method": self.method_name}
        if "lamda_grid" in self.settings:
            texts["setting"] += f", lamda {_text(self.settings.get('lamda'))} (auto)"
        return list(texts.values())

    def other_settings(self) -> str:
        return ", ".join(f"{key}={_text(value)}" for key, value in self.distinct.items())


def _text(value) -> str:
    return "-" if value is None else str(value)


def _key(value) -> str:
    """``value`` as canonical JSON, so that settings holding lists and dicts compare and hash by content."""
    return json.dumps(value, sort_keys=True)


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, or an :class:`InputError` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: holds a JSON {type(data).__name__}, not an object of results.")
    return data


def _accuracy(path: Path, where: str, acc, ci95) -> tuple[float, float]:
    """``(acc, ci95)`` as floats; an accuracy that is no fraction (a diverged run) is an error."""
    try:
        acc, ci95 = float(acc), float(ci95)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {where}: accuracy {acc!r} +- {ci95!r} is not a number.") from None
    if not (math.isfinite(acc) and 0.0 <= acc <= 1.0 and math.isfinite(ci95) and ci95 >= 0.0):
        raise InputError(f"{path}: {where}: accuracy {acc} +- {ci95} is not a finite fraction with a CI >= 0; "
                         f"see that run's log.")
    return acc, ci95


def load_result(path: Path) -> list[RunResult]:
    """The runs of one ``result.json`` (one per shot), its settings merged over those of its ``config.json``."""
    data = read_json(path)
    config = read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
    meta = "method" not in data and "head" in data
    method = f"tasnet_{data['head']}" if meta else data.get("method")
    if not isinstance(method, str):
        raise InputError(f"{path}: neither a meta-stage result (no 'head') nor one with a 'method'; it holds "
                         f"{sorted(data)[:12]}.")
    proto = method == "protonet"  # run_proto.py: every shot in one file; 'episodes' and 'query' for test_*
    needed = ("shots", "episodes") if proto else ("test_acc", "test_ci95", "test_episodes", "shot")
    missing = [key for key in ("dataset", "model_type", "way", *needed) if key not in data]
    if missing:
        raise InputError(f"{path}: a {method} result without {', '.join(missing)}; re-create it with the stage "
                         f"that wrote it.")
    if proto:
        shots = data["shots"]
        if not (isinstance(shots, dict) and shots
                and all(isinstance(cell, dict) and {"acc", "ci95"} <= cell.keys() for cell in shots.values())):
            raise InputError(f"{path}: each entry of 'shots' (one at least) should hold 'acc' and 'ci95'; "
                             f"got {shots!r}.")
        per_shot = {shot: {"test": (cell["acc"], cell["ci95"])} for shot, cell in shots.items()}
    else:
        per_shot = {data["shot"]: {figure: (data[f"test_acc{suffix}"], data.get(f"test_ci95{suffix}"))
                                   for figure, suffix in FIGURES.items() if f"test_acc{suffix}" in data}}
    renamed = {"episodes": "test_episodes", "query": "test_query"} if proto else {}
    ignored = NOT_SETTINGS | {"shot"} | ({"head"} if meta else set())
    settings = {renamed.get(key, key): value for key, value in {**config, **data}.items() if key not in ignored}
    runs = []
    for shot, figures in per_shot.items():
        if not str(shot).isdigit() or int(shot) < 1:
            raise InputError(f"{path}: shot {shot!r} is not a positive whole number.")
        figures = {figure: _accuracy(path, f"{shot}-shot {figure}", *pair) for figure, pair in figures.items()}
        runs.append(RunResult(path, {**settings, "method": method}, int(shot), data.get("seed"), figures))
    return runs


def _sort_value(value) -> tuple:
    """Numbers before strings before missing values, so that 100 episodes sort before 600 and 1000."""
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _order(row: Row) -> tuple:
    """Dataset, backbone, way; the methods of METHOD_NAMES in order, then others by name; then the settings."""
    settings, method = row.settings, row.settings["method"]
    rank = list(METHOD_NAMES).index(method) if method in METHOD_NAMES else len(METHOD_NAMES)
    first = [_sort_value(settings.get(key)) for key in ("dataset", "model_type", "way")]
    last = [_sort_value(settings.get(key)) for key in ("lamda", "inner_state", "test_episodes")]
    return (*first, rank, method, _sort_value(settings.get("setting")), "lamda_grid" in settings, *last,
            [(key, _key(value)) for key, value in row.distinct.items()])


def collect(folders: Sequence[str | Path]) -> list[Row]:
    """The rows of every ``result.json`` under ``folders`` (a file given itself is read alone), in table order;
    the same settings, shot and seed twice are one run, the first in path order."""
    found = set()
    for path in map(resolve_path, folders):
        if not path.exists():
            raise InputError(f"{path}: no such folder.")
        found.update(p.resolve() for p in ([path] if path.is_file() else path.rglob("result.json")))
    if not found:
        raise InputError(f"no result.json found under {', '.join(str(resolve_path(f)) for f in folders)}; pass "
                         f"the run folders of run_proto.py, run_fusion.py, run_concatenation.py or run_demo.py.")
    kept: dict[tuple, RunResult] = {}
    rows: dict[str, Row] = {}
    for run in (run for path in sorted(found) for run in load_result(path)):
        twin = kept.setdefault((_key(run.settings), run.shot, _key(run.seed)), run)
        if twin is not run:
            print(f"warning: {run.path}: the same settings and seed ({run.seed}) as {twin.path}, so not an "
                  f"independent run; only {twin.path} is counted.", file=sys.stderr, flush=True)
            continue
        row = rows.setdefault(_key(run.settings), Row(run.settings))
        for figure in run.figures:
            row.figures.setdefault((run.shot, figure), Cell(figure)).runs.append(run)
    alike: dict[tuple, list[Row]] = {}
    for row in rows.values():
        alike.setdefault(tuple(row.columns()), []).append(row)
    for group in alike.values():
        keys = sorted(set().union(*(row.settings for row in group)))
        differing = [key for key in keys if len({_key(row.settings.get(key)) for row in group}) > 1]
        for row in group:
            row.distinct = {key: row.settings.get(key) for key in differing}
    return sorted(rows.values(), key=_order)


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown: per shot a column of the runs' own test, then one per protocol any row has."""
    order = list(FIGURES)
    figures = sorted({key for row in rows for key in row.figures}, key=lambda key: (key[0], order.index(key[1])))
    with_other = any(row.distinct for row in rows)
    header = [title for _, title in COLUMNS] + (["other settings"] if with_other else [])
    header += [f"{shot}-shot" + ("" if figure == "test" else f" {figure}") for shot, figure in figures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = row.columns() + ([row.other_settings()] if with_other else [])
        cells += [row.figures[key].text() if key in row.figures else "-" for key in figures]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy in %, mean +- 95% CI over the test episodes; (n=K): the mean of K runs with the "
                  "same settings (different seeds) and the 95% CI of that mean."]
    if any(figure != "test" for _, figure in figures):
        lines.append("reset: every test episode fits its regressor from the trained state (independent episodes); "
                     "carry: the regressor carried on from episode to episode, as the release tests.")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """``results.csv``: a line per row and shot; accuracies as fractions; every setting in its own column."""
    first = ["method_name", *(key for key, _ in COLUMNS), "shot", "acc", "ci95", "runs", "seeds", "run_accs",
             "acc_reset", "ci95_reset", "acc_carry", "ci95_carry"]
    fields = first + sorted(set().union(*(row.settings for row in rows)) - set(first)) + ["files"]
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            for shot, cell in sorted(row.cells.items()):
                line = {key: json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
                        for key, value in row.settings.items()}
                line.update(method_name=row.method_name, shot=shot, runs=len(cell.runs),
                            seeds=" ".join(_text(run.seed) for run in cell.runs),
                            run_accs=" ".join(repr(run.figures["test"][0]) for run in cell.runs),
                            files=";".join(str(run.path) for run in cell.runs))
                for figure, suffix in FIGURES.items():
                    if (shot, figure) in row.figures:
                        combined = row.figures[(shot, figure)]
                        line.update({f"acc{suffix}": repr(combined.acc), f"ci95{suffix}": repr(combined.ci95)})
                writer.writerow(line)


def plot(rows: Sequence[Row], path: Path) -> None:
    """``results.png``: a panel per shot and a bar per row with its 95% CI; a row with both protocols gets two
    bars instead, reset and carry (hatched)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    shots = sorted({shot for row in rows for shot in row.cells})
    fig, axes = plt.subplots(1, len(shots), figsize=(3 + 4 * len(shots), 1.5 + 0.4 * len(rows)), sharey=True,
                             squeeze=False)
    methods = list(dict.fromkeys(row.settings["method"] for row in rows))  # a colour per method
    positions = range(len(rows) - 1, -1, -1)  # first row on top
    for ax, shot in zip(axes[0], shots):
        for position, row in zip(positions, rows):
            recorded = [figure for figure in FIGURES if (shot, figure) in row.figures]
            bars = [figure for figure in recorded if figure != "test"] or recorded  # the protocols where recorded
            color = plt.get_cmap("tab10")(methods.index(row.settings["method"]) % 10)
            for i, figure in enumerate(bars):
                cell, height = row.figures[(shot, figure)], 0.8 / len(bars)
                ax.barh(position + 0.4 - height * (i + 0.5), 100 * cell.acc, height, xerr=100 * cell.ci95,
                        capsize=3, alpha=0.85, color=color, hatch="//" if figure == "carry" else None)
        ax.set(title=f"{shot}-shot", xlabel="test accuracy (%), 95% CI", xlim=(0, 100))
        ax.grid(axis="x", alpha=0.3)
    if any(figure != "test" for row in rows for _, figure in row.figures):
        axes[0][-1].legend(handles=[Patch(facecolor="grey", label="reset"),
                                    Patch(facecolor="grey", hatch="//", label="carry")], fontsize=8)
    labels = []
    for row in rows:  # the columns and what tells the row apart, those that are set
        method, dataset, backbone, way, setting, inner_state, episodes = row.columns()
        parts = [method, f"{dataset}/{backbone} {way}-way", setting, inner_state, f"{episodes} ep",
                 row.other_settings()]
        labels.append(", ".join(part for part in parts if part not in ("", "-")))
    axes[0][0].set_yticks(list(positions), labels, fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def report(folders: Sequence[str | Path], out: str | Path | None = None) -> tuple[list[Row], str]:
    """Collect the results under ``folders``; write results.csv and results.png into ``out`` (default: the first
    folder). Returns the rows and the Markdown table (the caller writes it where it belongs)."""
    rows = collect(folders)
    out_dir = resolve_path(out if out is not None else folders[0])
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
    """Print the table and write it as results.md beside the CSV and the plot."""
    _, table = report(args.run_dirs, args.out)
    out_dir = resolve_path(args.out if args.out is not None else args.run_dirs[0])
    with atomic_write(out_dir / "results.md", "w") as f:
        f.write(table + "\n")
    print(f"{table}\n\nwrote results.md, results.csv and results.png into {out_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    from utils.cli import run_cli
    run_cli(report_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
