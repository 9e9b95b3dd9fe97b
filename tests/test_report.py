"""``python -m trainer.report``: result.json files of every stage into one table, never averaging across settings."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from trainer import report
from utils import InputError, save_json


def meta_result(**changes) -> dict:
    """A result.json as trainer.meta.MetaRun.test writes it."""
    result = {"test_acc": 0.55, "test_ci95": 0.02, "test_episodes": 600, "val_best_acc": 0.5, "val_best_epoch": 3,
              "dataset": "mini", "model_type": "res12", "head": "fusion", "shot": 1, "way": 5, "test_query": 15,
              "setting": "in", "inner_state": "reset", "trained_inner_state": "reset", "metric": "euclidean",
              "lamda": 0.05, "normalize_input": "never", "semantic_dim": 300, "seed": 1, "episodes_per_s": 50.0,
              "weights": "/somewhere/max_acc.pth", "device": "cpu", "git_commit": "abc"}
    return {**result, **changes}


def proto_result(**changes) -> dict:
    """A result.json as trainer.evaluate.proto_baseline (run_proto.py) writes it: several shots in one file."""
    result = {"method": "protonet", "dataset": "mini", "model_type": "res12", "split": "test", "way": 5,
              "query": 15, "episodes": 600, "seed": 1, "features": "/data/feat-test.npz", "weights": "/w.pth",
              "shots": {"1": {"acc": 0.5, "ci95": 0.01}, "5": {"acc": 0.7, "ci95": 0.008}}}
    return {**result, **changes}


def finetune_result(**changes) -> dict:
    """A result.json of the release's fine-tuned ProtoNet phase."""
    result = {"method": "protonet_finetune", "test_acc": 0.52, "test_ci95": 0.011, "test_episodes": 600,
              "dataset": "mini", "model_type": "res12", "shot": 1, "way": 5, "test_query": 15, "seed": 1}
    return {**result, **changes}


def write(folder: Path, result: dict, config: dict | None = None) -> Path:
    save_json(folder / "result.json", result)
    if config is not None:
        save_json(folder / "config.json", config)
    return folder / "result.json"


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of a Markdown table, as lists of stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_feature_finetuned_and_meta_results_share_one_table_and_csv(tmp_path, capsys):
    runs = tmp_path / "runs"
    write(runs / "proto", proto_result())
    write(runs / "finetune" / "a", finetune_result())
    write(runs / "finetune" / "b", finetune_result(shot=5, test_acc=0.71, test_ci95=0.009))
    for head, acc in (("fusion", 0.55), ("concat", 0.53)):
        for shot in (1, 5):
            write(runs / head / f"shot{shot}", meta_result(head=head, shot=shot, test_acc=acc + 0.2 * (shot == 5)))
    report.main([str(runs), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert header == "| method | dataset | backbone | way | setting | inner state | test episodes | 1-shot | 5-shot |"
    assert table_rows(out) == [
        ["ProtoNet (features)", "mini", "res12", "5", "-", "-", "600", "50.00 +- 1.00", "70.00 +- 0.80"],
        ["ProtoNet (fine-tuned)", "mini", "res12", "5", "-", "-", "600", "52.00 +- 1.10", "71.00 +- 0.90"],
        ["TasNet fusion", "mini", "res12", "5", "in", "reset", "600", "55.00 +- 2.00", "75.00 +- 2.00"],
        ["TasNet concat", "mini", "res12", "5", "in", "reset", "600", "53.00 +- 2.00", "73.00 +- 2.00"],
    ]
    lines = read_csv(tmp_path / "out" / "results.csv")
    assert len(lines) == 8
    first = lines[0]
    assert (first["method"], first["method_name"], first["shot"], first["runs"]) == \
        ("protonet", "ProtoNet (features)", "1", "1")
    assert float(first["acc"]) == 0.5 and float(first["ci95"]) == 0.01
    assert first["test_query"] == "15" and first["split"] == "test"  # run_proto.py's query / episodes, renamed
    fusion_5 = next(line for line in lines if line["method"] == "tasnet_fusion" and line["shot"] == "5")
    assert fusion_5["metric"] == "euclidean" and fusion_5["lamda"] == "0.05" and fusion_5["semantic_dim"] == "300"
    assert fusion_5["files"] == str((runs / "fusion" / "shot5" / "result.json").resolve())
    # measurements and provenance are not settings
    assert not {"weights", "device", "git_commit", "episodes_per_s", "val_best_acc", "seed"} & set(first)
    png = tmp_path / "out" / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_defaults_to_the_first_folder(tmp_path):
    write(tmp_path / "a", meta_result())
    write(tmp_path / "b", proto_result())
    rows, _ = report.report([tmp_path / "a", tmp_path / "b"])
    assert len(rows) == 2
    assert (tmp_path / "a" / "results.csv").is_file() and (tmp_path / "a" / "results.png").is_file()
    assert not (tmp_path / "b" / "results.csv").exists()


@pytest.mark.parametrize("change", [dict(inner_state="carry"), dict(setting="tran"), dict(lamda=0.5),
                                    dict(test_episodes=100), dict(metric="cosine"), dict(way=20)])
def test_runs_that_differ_in_a_setting_are_never_combined(tmp_path, change):
    write(tmp_path / "a", meta_result(seed=1, test_acc=0.55))
    write(tmp_path / "b", meta_result(seed=2, test_acc=0.60, **change))
    rows = report.collect([tmp_path])
    assert len(rows) == 2
    assert sorted(row.cells[1].acc for row in rows) == [0.55, 0.60]
    assert all(len(row.cells[1].runs) == 1 for row in rows)


def test_rows_that_look_alike_name_what_tells_them_apart(tmp_path, capsys):
    """lamda is no column of the table: an extra column shows it, only where it is needed."""
    write(tmp_path / "a", meta_result(lamda=0.05))
    write(tmp_path / "b", meta_result(lamda=0.5))
    write(tmp_path / "c", meta_result(head="concat"))
    _, markdown = report.report([tmp_path])
    assert "| other settings |" in markdown
    rows = table_rows(markdown)
    assert [row[7] for row in rows] == ["lamda=0.05", "lamda=0.5", ""]


def test_training_settings_from_config_json_keep_runs_apart(tmp_path):
    """Two meta runs whose result.json agree but which trained differently (config.json) are two rows."""
    config = {"max_epoch": 10, "num_batch": 100, "seed": 1, "run_dir": "x", "device": "cpu", "threads": 1,
              "episode_batch": 100, "command": "run_fusion.py", "head": "fusion", "shot": 1}
    write(tmp_path / "a", meta_result(seed=1), config)
    write(tmp_path / "b", meta_result(seed=2), {**config, "max_epoch": 1, "seed": 2, "run_dir": "y"})
    rows = report.collect([tmp_path])
    assert sorted(row.distinct["max_epoch"] for row in rows) == [1, 10]
    # the run folder, device, seed and the batch of gathered episodes are no settings: the same recipe combines
    write(tmp_path / "c", meta_result(seed=3), {**config, "seed": 3, "run_dir": "z", "device": "cuda",
                                                "threads": 8, "episode_batch": 10})
    rows = report.collect([tmp_path])
    assert sorted(len(row.cells[1].runs) for row in rows) == [1, 2]


def test_seeds_with_identical_settings_are_one_row_with_the_ci_of_their_mean(tmp_path, capsys):
    accs = (0.50, 0.54, 0.58)
    for seed, acc in enumerate(accs, start=1):
        write(tmp_path / f"seed{seed}", meta_result(seed=seed, test_acc=acc, test_ci95=0.001))
    write(tmp_path / "proto", proto_result())
    rows = report.collect([tmp_path])
    fusion = next(row for row in rows if row.settings["method"] == "tasnet_fusion")
    cell = fusion.cells[1]
    assert len(cell.runs) == 3 and [run.seed for run in cell.runs] == [1, 2, 3]
    assert cell.acc == pytest.approx(0.54)
    # Student's t with 2 degrees of freedom times the sample std (0.04) over sqrt(3)
    assert cell.ci95 == pytest.approx(4.303 * 0.04 / math.sqrt(3), rel=1e-4)   # t(0.975, 2) = 4.303
    assert "54.00 +- 9.94 (n=3)" in report.markdown(rows)
    report.write_csv(rows, tmp_path / "results.csv")
    line = next(line for line in read_csv(tmp_path / "results.csv") if line["method"] == "tasnet_fusion")
    assert line["runs"] == "3" and line["seeds"] == "1 2 3"
    assert [float(a) for a in line["run_accs"].split()] == list(accs)


def test_combined_ci_is_never_narrower_than_the_episodes_give(tmp_path):
    """Two seeds that happen to agree still leave the uncertainty of their test episodes."""
    write(tmp_path / "a", meta_result(seed=1, test_acc=0.6, test_ci95=0.03))
    write(tmp_path / "b", meta_result(seed=2, test_acc=0.6, test_ci95=0.04))
    (row,) = report.collect([tmp_path])
    assert row.cells[1].ci95 == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)


def test_the_same_seed_twice_counts_once(tmp_path, capsys):
    first = write(tmp_path / "a", meta_result(seed=1, test_acc=0.55))
    second = write(tmp_path / "b", meta_result(seed=1, test_acc=0.56))
    (row,) = report.collect([tmp_path, tmp_path / "a"])  # a folder inside another one is read once too
    assert [run.path for run in row.cells[1].runs] == [first.resolve()]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(second.resolve()) in err and str(first.resolve()) in err


def test_a_result_file_given_itself_is_read_alone(tmp_path):
    path = write(tmp_path / "a", meta_result())
    write(tmp_path / "b", meta_result(head="concat"))
    (row,) = report.collect([path])
    assert row.method_name == "TasNet fusion"


def test_missing_cells_show_a_dash(tmp_path):
    write(tmp_path / "a", meta_result(shot=5))
    write(tmp_path / "b", proto_result())
    rows = table_rows(report.markdown(report.collect([tmp_path])))
    assert rows[1][-2:] == ["-", "55.00 +- 2.00"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "not an object"),
    (json.dumps({"acc": 0.5}), "neither a meta-stage result"),
    (json.dumps({k: v for k, v in meta_result().items() if k != "test_ci95"}), "without test_ci95"),
    (json.dumps({k: v for k, v in proto_result().items() if k != "shots"}), "without shots"),
    (json.dumps(proto_result(shots={"1": {"acc": 0.5}})), "should hold 'acc' and 'ci95'"),
    (json.dumps(finetune_result(shot="two")), "shot 'two'"),
    (json.dumps(meta_result(test_acc=float("nan"))), "not a finite fraction"),
    (json.dumps(meta_result(test_acc=55.0)), "not a finite fraction"),
])
def test_a_bad_result_file_is_an_error_naming_it(tmp_path, content, message):
    write(tmp_path / "good", meta_result())
    bad = tmp_path / "bad" / "result.json"
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        report.collect([tmp_path])
    assert str(bad.resolve()) in str(err.value)


def test_a_bad_config_beside_a_result_is_an_error_naming_it(tmp_path):
    write(tmp_path / "a", meta_result())
    (tmp_path / "a" / "config.json").write_text("{")
    with pytest.raises(InputError, match="config.json: not a readable JSON file"):
        report.collect([tmp_path])


def test_no_result_files_is_an_error_naming_the_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match="no result.json found") as err:
        report.collect([tmp_path / "empty", tmp_path / "other"])
    assert str(tmp_path / "empty") in str(err.value) and str(tmp_path / "other") in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path / "empty")])
    assert exit_.value.code == 2 and "no result.json found" in capsys.readouterr().err


def test_a_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(InputError, match="nowhere: no such folder"):
        report.collect([tmp_path / "nowhere"])


def test_t975_is_the_student_t_quantile_and_tends_to_1_96():
    assert report.t975(1) == pytest.approx(12.706, abs=1e-3) and report.t975(30) == pytest.approx(2.042, abs=1e-3)
    assert report.t975(60) == pytest.approx(2.0003, abs=1e-3)
    assert report.t975(10_000) == pytest.approx(1.96, abs=1e-3)


def with_protocols(reset=(0.56, 0.02), carry=(0.58, 0.03), **changes) -> dict:
    """A meta result.json that also records the checkpoint's test under both protocols."""
    protocols = dict(test_acc_reset=reset[0], test_ci95_reset=reset[1], test_acc_carry=carry[0],
                     test_ci95_carry=carry[1], carry_block_acc=[0.57, 0.59])
    return meta_result(**{**protocols, **changes})


def test_both_test_protocols_get_their_columns_beside_the_usual_one(tmp_path):
    write(tmp_path / "fusion", with_protocols())
    write(tmp_path / "proto", proto_result())
    rows, markdown = report.report([tmp_path], tmp_path / "out")
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert header.endswith("| 1-shot | 1-shot reset | 1-shot carry | 5-shot |")
    assert table_rows(markdown) == [
        ["ProtoNet (features)", "mini", "res12", "5", "-", "-", "600", "50.00 +- 1.00", "-", "-", "70.00 +- 0.80"],
        ["TasNet fusion", "mini", "res12", "5", "in", "reset", "600", "55.00 +- 2.00", "56.00 +- 2.00",
         "58.00 +- 3.00", "-"],
    ]
    assert "carry: the regressor carried on" in markdown
    lines = read_csv(tmp_path / "out" / "results.csv")
    fusion = next(line for line in lines if line["method"] == "tasnet_fusion")
    assert [float(fusion[key]) for key in ("acc", "acc_reset", "ci95_reset", "acc_carry", "ci95_carry")] == \
        [0.55, 0.56, 0.02, 0.58, 0.03]
    assert all(line[key] == "" for line in lines if line["method"] == "protonet"
               for key in ("acc_reset", "ci95_reset", "acc_carry", "ci95_carry"))
    assert "carry_block_acc" not in fusion  # a measurement, not a setting


def test_results_without_protocols_keep_the_old_table(tmp_path):
    write(tmp_path / "a", meta_result())
    _, markdown = report.report([tmp_path])
    assert "reset |" not in markdown.splitlines()[0] and "carry:" not in markdown
    line = read_csv(tmp_path / "results.csv")[0]
    assert line["acc"] == "0.55" and line["acc_reset"] == line["acc_carry"] == ""


def test_protocol_figures_of_seeds_combine_like_the_usual_one(tmp_path):
    write(tmp_path / "a", with_protocols(seed=1, reset=(0.50, 0.001), carry=(0.60, 0.03)))
    write(tmp_path / "b", with_protocols(seed=2, reset=(0.54, 0.001), carry=(0.60, 0.04)))
    write(tmp_path / "c", meta_result(seed=3))  # an older run of the same recipe, without the protocols
    (row,) = report.collect([tmp_path])
    assert len(row.cells[1].runs) == 3
    reset, carry = row.figures[(1, "reset")], row.figures[(1, "carry")]
    assert len(reset.runs) == 2 and reset.acc == pytest.approx(0.52)
    assert reset.ci95 == pytest.approx(report.t975(1) * math.sqrt(0.02 ** 2 * 2) / math.sqrt(2))
    assert carry.ci95 == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)
    assert "52.00 +- 25.41 (n=2)" in report.markdown([row])


def test_the_plot_draws_reset_and_carry_bars_for_rows_that_have_them(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.barh
    monkeypatch.setattr(Axes, "barh", lambda self, y, width, *args, **kwargs:
                        drawn.append((width, kwargs.get("hatch"))) or original(self, y, width, *args, **kwargs))
    write(tmp_path / "fusion", with_protocols())
    write(tmp_path / "concat", meta_result(head="concat", test_acc=0.53))
    report.report([tmp_path])
    drawn.sort(key=lambda bar: bar[0])
    assert [width for width, _ in drawn] == pytest.approx([53.0, 56.0, 58.0])  # concat; fusion reset, carry
    assert [hatch for _, hatch in drawn] == [None, None, "//"]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_lamda_chosen_on_validation_shows_with_the_setting(tmp_path):
    auto = dict(lamda_grid=[0.05, 0.3, 0.5], lamda_val_acc=[0.50, 0.52, 0.51])
    write(tmp_path / "a", with_protocols(seed=1, lamda=0.3, **auto), {"lamda": "auto", "seed": 1})
    write(tmp_path / "b", with_protocols(seed=2, lamda=0.3, **{**auto, "lamda_val_acc": [0.49, 0.53, 0.5]}),
          {"lamda": "auto", "seed": 2})
    write(tmp_path / "c", with_protocols(seed=3, lamda=0.5, **auto), {"lamda": "auto", "seed": 3})
    write(tmp_path / "fixed", with_protocols(lamda=0.3))
    rows, markdown = report.report([tmp_path])
    assert "other settings" not in markdown  # the chosen lamda tells the rows apart in the setting column
    assert [row[4] for row in table_rows(markdown)] == ["in", "in, lamda 0.3 (auto)", "in, lamda 0.5 (auto)"]
    # seeds that chose the same lamda combine, whatever their validation accuracies
    assert [len(row.cells[1].runs) for row in rows] == [1, 2, 1]
    auto_line = read_csv(tmp_path / "results.csv")[1]
    assert auto_line["lamda"] == "0.3" and json.loads(auto_line["lamda_grid"]) == [0.05, 0.3, 0.5]
    assert "lamda_val_acc" not in auto_line


@pytest.mark.parametrize("changes, message", [
    (dict(test_ci95_reset=None), r"1-shot reset: accuracy 0.56 \+- None is not a number"),
    (dict(test_acc_carry=58.0), "1-shot carry: accuracy 58.0 .* not a finite fraction"),
])
def test_a_bad_protocol_figure_is_an_error_naming_the_file(tmp_path, changes, message):
    result = {key: value for key, value in with_protocols(**changes).items() if value is not None}
    bad = write(tmp_path / "bad", result)
    with pytest.raises(InputError, match=message) as err:
        report.collect([tmp_path])
    assert str(bad.resolve()) in str(err.value)
