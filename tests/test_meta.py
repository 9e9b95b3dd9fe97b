"""The episodic trainer end to end on class-structured synthetic features, its episodes, flags and errors."""
from __future__ import annotations

import argparse
import json
import runpy
from pathlib import Path

import pytest
import torch

from dataloader.datasets import load_features
from models.heads import HeadConfig, TasNet
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.evaluate import episode_indices
from trainer.meta import gather_episodes, main
from trainer.meta_config import DATASET_DEFAULTS, MetaConfig, build_parser
from trainer.runs import step_lr
from synthetic_data import DIM, release_meta_params, release_state_dict_keys, write_synthetic
from utils import InputError

REPO = Path(__file__).resolve().parent.parent
# small runs: 2 epochs x 8 episodes, 8 validation and 20 test episodes, 20 inner steps
QUICK = ["--max_epoch", "2", "--num_batch", "8", "--val_episodes", "8", "--test_episodes", "20",
         "--inner_steps", "20", "--device", "cpu", "--episode_batch", "16"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("meta-data"))


def script_parser(name: str) -> argparse.ArgumentParser:
    return runpy.run_path(str(REPO / name))["parser"]


def run(script: str, data_root: Path, run_dir: Path, *flags: str) -> list[dict]:
    args = script_parser(script).parse_args(["--data_root", str(data_root), "--run_dir", str(run_dir), *QUICK,
                                             *flags])
    return main(args)


@pytest.mark.parametrize("script", ["run_fusion.py", "run_concatenation.py"])
def test_defaults_are_the_release_run_scripts(script):
    args = script_parser(script).parse_args([])
    assert (args.lamda, args.gradlr, args.max_epoch, args.num_batch, args.shot, args.dataset) == (
        0.05, 0.01, 10, 100, [1, 5], "mini")
    assert args.model_type == {"run_fusion.py": "res12", "run_concatenation.py": "wrn28"}[script]


def test_explicit_flags_override_the_dataset_table():
    """The table itself is checked against the release in test_release_fidelity.py."""
    parser = build_parser()
    def flags(*argv):
        return MetaConfig.from_args(parser.parse_args(list(argv)), shot=1).flags()
    assert flags("--head", "concat", "--dataset", "tiered")["inner_step_size"] == 50
    overridden = flags("--head", "concat", "--dataset", "tiered", "--metric", "euclidean", "--inner_step_size", "7",
                       "--normalize_input", "never")
    assert (overridden["metric"], overridden["inner_step_size"], overridden["normalize_input"]) == ("euclidean", 7,
                                                                                                   "never")
    assert set(DATASET_DEFAULTS) >= {("fusion", "*"), ("concat", "*")}


def test_outer_lr_is_stepped_at_each_epoch_start():
    config = MetaConfig.from_args(build_parser().parse_args(["--vlr", "1e-3", "--gamma", "0.5"]), shot=1)
    lrs = [step_lr(config.vlr, config.gamma, config.step_size, e) for e in (1, 9, 10, 19, 20)]
    assert lrs == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_episode_order_labels_and_semantic_targets(data_root):
    split = load_features(data_root, "mini", "res12", "train")
    config = MetaConfig.from_args(build_parser().parse_args([]), shot=2)
    indices = episode_indices(split.targets, 5, 2, 3, 4, seed=0)
    batch = gather_episodes(split, indices, config, query=3, training=False)
    assert batch.support.shape == (4, 10, 640) and batch.query.shape == (4, 15, 640)
    assert torch.equal(batch.query_labels, torch.arange(5).repeat(3))
    labels = split.targets[indices]                                            # (4, 25) dataset classes
    classes = labels[:, :5]
    # shot-major: sample i of the support and of the query belongs to episode class i % way
    assert torch.equal(labels, classes.repeat(1, 5))
    assert torch.equal(batch.semantic_protos, split.class_vectors[classes])
    assert torch.equal(batch.support_targets, split.class_vectors[classes.repeat(1, 2)])
    assert torch.equal(batch.support, split.features[indices[:, :10]])


@pytest.mark.slow
def test_fusion_learns_two_shots_and_eval_weights_reproduces_the_test(data_root, tmp_path):
    results = run("run_fusion.py", data_root, tmp_path / "f", "--shot", "1", "5")
    assert [r["shot"] for r in results] == [1, 5]
    assert all(r["test_acc"] > 0.6 for r in results)                          # chance is 0.2
    folder = tmp_path / "f" / "shot1"
    saved = json.loads((folder / "result.json").read_text())
    for key in ("test_acc", "test_ci95", "test_episodes", "val_best_acc", "dataset", "model_type", "head", "shot",
                "way", "setting", "inner_state", "seed", "episodes_per_s", "git_commit"):
        assert key in saved, key
    assert (saved["head"], saved["shot"], saved["inner_state"], saved["setting"]) == ("fusion", 1, "reset", "in")
    for shot in (1, 5):
        for name in ("config.json", "log.jsonl", "max_acc.pth", "curves.png", "result.json"):
            assert (tmp_path / "f" / f"shot{shot}" / name).is_file()
    assert len((folder / "log.jsonl").read_text().splitlines()) == 2
    (again,) = run("run_fusion.py", data_root, tmp_path / "e", "--shot", "1", "--eval_weights",
                   str(folder / "max_acc.pth"))
    assert again["test_acc"] == results[0]["test_acc"] and again["val_best_acc"] == results[0]["val_best_acc"]
    assert (tmp_path / "e" / "result.json").is_file()
    assert not (tmp_path / "e" / "log.jsonl").exists() or not (tmp_path / "e" / "log.jsonl").read_text()
    # reset mode never changes the regressor: the checkpoint holds its seeded initial state
    torch.manual_seed(1)
    initial = TasNet(640, DIM, HeadConfig())
    params = load_checkpoint(folder / "max_acc.pth")["params"]
    assert torch.equal(params["word_learner.weight"], initial.word_learner.weight.detach())


@pytest.mark.slow
def test_carry_concat_saves_the_carried_regressor_and_eval_reproduces(data_root, tmp_path, capsys):
    (result,) = run("run_concatenation.py", data_root, tmp_path / "c", "--model_type", "res12", "--shot", "1",
                    "--inner_state", "carry")
    assert result["inner_state"] == "carry" and result["test_acc"] > 0.5
    assert (tmp_path / "c" / "result.json").is_file()
    out = capsys.readouterr().out
    assert "Test Acc " in out and "inner_state carry" in out
    params = load_checkpoint(tmp_path / "c" / "max_acc.pth")["params"]
    torch.manual_seed(1)
    initial = TasNet(640, DIM, HeadConfig(head="concat"))
    assert (params["word_learner.weight"] - initial.word_learner.weight).abs().max() > 1e-3
    (again,) = run("run_concatenation.py", data_root, tmp_path / "ce", "--model_type", "res12", "--shot", "1",
                   "--inner_state", "carry", "--eval_weights", str(tmp_path / "c" / "max_acc.pth"))
    assert again["test_acc"] == result["test_acc"]


@pytest.mark.slow
def test_every_test_reports_both_protocols_as_separate_evaluations_give_them(data_root, tmp_path, capsys):
    """A reset-trained fusion model, 250 test episodes: the run's result holds the independent and the carried
    accuracy, each equal to an --eval_weights test with that --inner_state, and the carried one per block of 100."""
    (result,) = run("run_fusion.py", data_root, tmp_path / "f", "--shot", "1", "--test_episodes", "250")
    out = capsys.readouterr().out
    assert "independent episodes (reset): " in out and "carried, as the release (carry): " in out
    assert (result["test_acc"], result["test_ci95"]) == (result["test_acc_reset"], result["test_ci95_reset"])
    weights = str(tmp_path / "f" / "max_acc.pth")
    for state in ("reset", "carry"):
        (alone,) = run("run_fusion.py", data_root, tmp_path / state, "--shot", "1", "--test_episodes", "250",
                       "--inner_state", state, "--eval_weights", weights)
        assert (alone["test_acc"], alone["test_ci95"]) == (result[f"test_acc_{state}"], result[f"test_ci95_{state}"])
        assert (alone["test_acc_reset"], alone["test_acc_carry"]) == (result["test_acc_reset"],
                                                                      result["test_acc_carry"])
    blocks = result["carry_block_acc"]
    assert len(blocks) == 3 and (100 * blocks[0] + 100 * blocks[1] + 50 * blocks[2]) / 250 == pytest.approx(
        result["test_acc_carry"], abs=1e-6)
    assert result["test_acc_carry"] != result["test_acc_reset"]


@pytest.mark.slow
def test_lamda_auto_trains_one_model_per_value_and_tests_the_best_on_validation(data_root, tmp_path, capsys):
    (result,) = run("run_fusion.py", data_root, tmp_path / "a", "--shot", "1", "--lamda", "auto", "--lamda_grid",
                    "0", "0.5", "1")
    assert result["lamda_grid"] == [0.0, 0.5, 1.0] and len(result["lamda_val_acc"]) == 3
    best = max(range(3), key=lambda i: (result["lamda_val_acc"][i], -i))
    assert result["lamda"] == result["lamda_grid"][best] and result["val_best_acc"] == result["lamda_val_acc"][best]
    for value in ("0", "0.5", "1"):
        folder = tmp_path / "a" / f"lamda{value}"
        assert (folder / "max_acc.pth").is_file() and not (folder / "result.json").exists()   # only the best is tested
        assert json.loads((folder / "config.json").read_text())["lamda"] == float(value)
    assert json.loads((tmp_path / "a" / "result.json").read_text())["lamda"] == result["lamda"]
    assert f"lamda {result['lamda']:g} has the best validation accuracy" in capsys.readouterr().out
    # what the run tested is what --eval_weights with the chosen lambda gives
    (alone,) = run("run_fusion.py", data_root, tmp_path / "e", "--shot", "1", "--lamda", str(result["lamda"]),
                   "--eval_weights", str(tmp_path / "a" / f"lamda{result['lamda']:g}" / "max_acc.pth"))
    assert alone["test_acc"] == result["test_acc"]


def test_pretraining_flags_do_nothing_in_the_meta_stage_and_say_so(data_root, tmp_path, capsys):
    with pytest.raises(InputError):  # stop before any work: the data root has no such dataset
        run("run_fusion.py", data_root, tmp_path / "p", "--pre_lr", "0.5", "--pre_max_epoch", "3", "--dataset",
            "nowhere")
    assert capsys.readouterr().out.splitlines()[0] == ("note: --pre_max_epoch --pre_lr configure pretraining "
                                                       "(run_pre.py) and do nothing in this stage")


@pytest.mark.slow
def test_release_meta_checkpoint_evaluates_as_the_release(data_root, tmp_path, reference_dir, capsys):
    """A meta checkpoint in the release's layout, holding the same weights as one of ours, tests identically:
    carry mode continues its carried regressor; reset mode says where the release's number comes from."""
    (ours,) = run("run_fusion.py", data_root, tmp_path / "ours", "--shot", "1", "--inner_state", "carry",
                  "--max_epoch", "1")
    params = load_checkpoint(tmp_path / "ours" / "max_acc.pth")["params"]
    release = release_meta_params({k[13:]: v for k, v in params.items() if k.startswith("feat_learner.")},
                                  {k[13:]: v for k, v in params.items() if k.startswith("word_learner.")},
                                  release_state_dict_keys(reference_dir / "res12_state_dict.txt"))
    torch.save({"params": release}, tmp_path / "release.pth")       # no metadata, as the release saves it
    capsys.readouterr()
    (carried,) = run("run_fusion.py", data_root, tmp_path / "rc", "--shot", "1", "--inner_state", "carry",
                     "--eval_weights", str(tmp_path / "release.pth"))
    assert carried["test_acc"] == ours["test_acc"] and "--inner_state carry" not in capsys.readouterr().out
    run("run_fusion.py", data_root, tmp_path / "rr", "--shot", "1", "--eval_weights", str(tmp_path / "release.pth"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:") and "release" in line]
    assert len(notes) == 1 and "--inner_state carry" in notes[0]


@pytest.mark.parametrize("inner_state", ["reset", "carry"])
@pytest.mark.slow
def test_transductive_setting_trains_and_tests_above_chance(data_root, tmp_path, inner_state):
    (result,) = run("run_fusion.py", data_root, tmp_path / "t", "--shot", "1", "--setting", "tran",
                    "--inner_state", inner_state, "--max_epoch", "1", "--kmeans_n_init", "3")
    assert result["setting"] == "tran" and 0.2 < result["test_acc"] <= 1.0


def test_eval_weights_of_another_dimension_and_unextracted_features_name_the_fix(data_root, tmp_path):
    """(--setting tran --way 1, --lamda 2 and a backbone as --eval_weights: test_reliability.py, end to end.)"""
    parser = script_parser("run_fusion.py")
    def error(*flags) -> str:
        with pytest.raises(InputError) as info:
            main(parser.parse_args(["--data_root", str(data_root), "--run_dir", str(tmp_path / "x"), *QUICK,
                                    *flags]))
        return str(info.value)
    wrong_dim = tmp_path / "wrong.pth"
    save_checkpoint(wrong_dim, {"feat_learner.weight": torch.zeros(7, 640), "feat_learner.bias": torch.zeros(7),
                                "word_learner.weight": torch.zeros(7, 640), "word_learner.bias": torch.zeros(7)},
                    kind="meta", semantic_dim=7, head="fusion")
    message = error("--eval_weights", str(wrong_dim))
    assert str(wrong_dim) in message and "D = 7" in message and f"D = {DIM}" in message
    message = error("--dataset", "cub")
    assert "run_pre.py" in message and "trainer.extract" in message


def test_missing_features_are_extracted_from_init_weights_and_cached(tiny_image_root, tmp_path):
    from models import build_backbone

    torch.manual_seed(0)
    backbone = tmp_path / "conv4.pth"                  # a CPU-sized backbone: this test is about the plumbing
    save_checkpoint(backbone, build_backbone("conv4").state_dict(), kind="backbone")
    (result,) = run("run_fusion.py", tiny_image_root, tmp_path / "x", "--model_type", "conv4", "--shot", "1",
                    "--way", "2", "--train_query", "2", "--val_query", "2", "--test_query", "2", "--max_epoch", "1",
                    "--num_batch", "2", "--val_episodes", "2", "--test_episodes", "4", "--init_weights", str(backbone))
    for split in ("train", "val", "test"):
        assert (tiny_image_root / "mini" / "conv4" / f"feat-{split}.npz").is_file()
    assert result["semantic_dim"] == 4 and 0 <= result["test_acc"] <= 1
