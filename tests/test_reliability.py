"""The catalogue of bad inputs (docs/troubleshooting.md), end to end through the entry points: each case exits
with code 2 and one ``error: ...`` line that names the file or flag and says how to fix it, before any training.
Then the resources: the out-of-memory advice (exit 3) and memory that stays flat over 2,000 episodes.

Cases already covered closer to their code are tested there (test_datasets, test_checkpoint, test_extract,
test_glove, test_prepare, test_sampler, test_pre, test_meta); this file adds the end-to-end view and the cases
that have no test of their own.
"""
from __future__ import annotations

import logging
import os
import pickle
import runpy
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import run_pre
import run_proto
from dataloader import prepare
from dataloader.datasets import FeatureSplit
from synthetic_data import write_synthetic
from synthetic_data import make_tiny_mini, mini_args
from trainer import meta
from trainer.meta_config import MetaConfig, build_parser
from trainer.checkpoint import save_checkpoint
from trainer.evaluate import episode_indices
from utils import REPO_ROOT, save_npz

DIM = 6
# the failing runs stop before training; were one to start, it would be tiny
TINY = ["--device", "cpu", "--shot", "1", "--max_epoch", "1", "--num_batch", "2", "--val_episodes", "2",
        "--test_episodes", "4", "--inner_steps", "2"]


@pytest.fixture()
def root(tmp_path) -> Path:
    """Synthetic cached features: train 8 classes, val 6, test 5, 20 samples each, D = 6."""
    return write_synthetic(tmp_path / "data", dim=DIM, classes=(8, 6, 5), per_class=20)


def fusion(root: Path, run_dir: Path, *flags: str) -> int:
    """``python run_fusion.py ...`` in-process; returns the exit code."""
    parser = runpy.run_path(str(REPO_ROOT / "run_fusion.py"))["parser"]
    return meta.cli(parser, ["--data_root", str(root), "--run_dir", str(run_dir), *TINY, *flags])


def error_line(capsys) -> str:
    """The one ``error: ...`` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def rewrite(path: Path, **arrays) -> None:
    """Replace (or, with None, drop) arrays of an npz file."""
    with np.load(path) as npz:
        content = {key: npz[key] for key in npz.files}
    content.update(arrays)
    save_npz(path, **{key: value for key, value in content.items() if value is not None})


def read(path: Path, key: str = "features") -> np.ndarray:
    with np.load(path) as npz:
        return npz[key]


def feat(root: Path, split: str) -> Path:
    return root / "mini" / "res12" / f"feat-{split}.npz"


def wordemb(root: Path, split: str) -> Path:
    return root / "mini" / f"few-shot-wordemb-{split}.npz"


# ------------------------------------------------------------------------------------------ data files
DATA_CASES = {
    "npz missing a key": (
        lambda r: rewrite(feat(r, "train"), targets=None), [],
        ["feat-train.npz: missing array(s) ['targets']", "Extract it with: python -m trainer.extract"]),
    "features not 2-D": (
        lambda r: rewrite(feat(r, "val"), features=read(feat(r, "val"))[:, None]), [],
        ["feat-val.npz: 'features' must be a 2-D float array (N, F)", "extract the features again"]),
    "features not float": (
        lambda r: rewrite(feat(r, "val"), features=read(feat(r, "val")).astype(np.int32)), [],
        ["feat-val.npz: 'features' must be a 2-D float array"]),
    "labels not 0..C-1": (
        lambda r: rewrite(feat(r, "test"), targets=read(feat(r, "test"), "targets") + 1), [],
        ["feat-test.npz: labels must be 0..C-1", "found 5 distinct labels between 1 and 5"]),
    "class-vector rows != classes": (
        lambda r: rewrite(wordemb(r, "val"), features=read(wordemb(r, "val"))[:4]), [],
        ["few-shot-wordemb-val.npz: class vectors must be (C, D) with one row per class",
         f"got (4, {DIM}) for a split with 6 classes"]),
    "class-vector D differs between splits": (
        lambda r: rewrite(wordemb(r, "test"), features=np.ones((5, DIM + 1), np.float32)), [],
        ["the splits disagree on the feature or class-vector size", "one word-vector file"]),
    "NaN in features": (
        lambda r: rewrite(feat(r, "train"), features=np.where(np.arange(640) == 3, np.nan,
                                                              read(feat(r, "train"))).astype(np.float32)), [],
        ["feat-train.npz: features contain NaN or Inf", "extract again from a sound checkpoint"]),
    "Inf in class vectors": (
        lambda r: rewrite(wordemb(r, "test"), features=np.full((5, DIM), np.inf, np.float32)), [],
        ["few-shot-wordemb-test.npz: class vectors contain NaN or Inf", "Re-run the prepare command"]),
    "truncated npz": (
        lambda r: feat(r, "val").write_bytes(feat(r, "val").read_bytes()[:2000]), [],
        ["feat-val.npz: not a readable .npz file", "it may be truncated. Delete it and re-create it"]),
    "dataset folder missing": (
        lambda r: None, ["--dataset", "tiered"],
        ["tiered/res12: no cached features for split(s) train, val, test", "few-shot-train.npz is missing",
         "Create it with: python -m dataloader.prepare tiered --raw <raw download folder> --glove"]),
    "split with fewer classes than way": (
        lambda r: None, ["--way", "6"],
        ["feat-test.npz (test split, --test_query 15): way=6 but the split has only 5 classes; lower --way"]),
    "class with fewer samples than shot+query": (
        lambda r: None, ["--shot", "2", "--val_query", "19"],
        ["feat-val.npz (val split, --val_query 19)", "has 20 samples, fewer than shot+query = 2+19 = 21",
         "lower --shot or the query count"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_files_stop_the_meta_stage_before_training(case, root, tmp_path, capsys):
    damage, flags, fragments = DATA_CASES[case]
    damage(root)
    assert fusion(root, tmp_path / "run", *flags) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (tmp_path / "run" / "max_acc.pth").exists()


def test_bad_images_and_impossible_validation_stop_pretraining_before_the_first_batch(tiny_image_root, tmp_path,
                                                                                      capsys):
    """Images not uint8 (N, 84, 84, 3); validation episodes the val split cannot fill (3 classes)."""
    flags = ["--device", "cpu", "--run_dir", str(tmp_path / "run"), "--pre_max_epoch", "1"]
    with pytest.raises(SystemExit) as exit_:
        run_pre.main(["--data_root", str(tiny_image_root), *flags, "--way", "5"])
    assert exit_.value.code == 2
    assert error_line(capsys) == "error: mini val: way=5 but the split has only 3 classes; lower --way."

    bad = tmp_path / "data"
    for split in ("train", "val"):
        with np.load(tiny_image_root / "mini" / f"few-shot-{split}.npz") as npz:
            images = npz["features"] if split == "val" else npz["features"].astype(np.float32)
            save_npz(bad / "mini" / f"few-shot-{split}.npz", features=images, targets=npz["targets"])
    with pytest.raises(SystemExit) as exit_:
        run_pre.main(["--data_root", str(bad), *flags])
    assert exit_.value.code == 2
    assert "few-shot-train.npz: 'features' must be uint8 images of shape (N, 84, 84, 3), got float32 " \
           "(12, 84, 84, 3). Re-run the prepare command." in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ checkpoints
class Payload:
    """Unpickling this would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def meta_params(dim: int) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": torch.zeros((dim, 640) if part == "weight" else (dim,))
            for name in ("feat_learner", "word_learner") for part in ("weight", "bias")}


def test_bad_eval_weights_are_refused_with_one_error_line_each(root, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"params": meta_params(DIM), "extra": Payload()}, evil)
    assert fusion(root, tmp_path / "a", "--eval_weights", str(evil)) == 2
    line = error_line(capsys)
    assert f"error: {evil}: refused: the checkpoint carries pickled Python objects" in line
    assert "GLOBAL posix.system" in line and "re-save just its tensors" in line  # names what was refused

    truncated = tmp_path / "truncated.pth"
    save_checkpoint(truncated, meta_params(DIM), kind="meta", head="fusion")
    truncated.write_bytes(truncated.read_bytes()[:500])
    assert fusion(root, tmp_path / "b", "--eval_weights", str(truncated)) == 2
    line = error_line(capsys)
    assert str(truncated) in line and "probably truncated" in line and "Re-download or re-create it" in line

    backbone = tmp_path / "backbone.pth"
    save_checkpoint(backbone, {"layer1.0.conv1.weight": torch.zeros(1)}, kind="backbone")
    assert fusion(root, tmp_path / "c", "--eval_weights", str(backbone)) == 2
    assert "not a meta checkpoint" in (line := error_line(capsys)) and "Pass a backbone as --init_weights" in line

    concat = tmp_path / "concat.pth"
    save_checkpoint(concat, meta_params(DIM), kind="meta", head="concat", semantic_dim=DIM)
    assert fusion(root, tmp_path / "d", "--eval_weights", str(concat)) == 2
    assert "trained with the concat head" in (line := error_line(capsys)) and "run_concatenation.py" in line

    assert fusion(root, tmp_path / "e", "--eval_weights", str(tmp_path / "none.pth")) == 2
    assert "--eval_weights" in error_line(capsys)


def test_backbone_of_another_architecture_lists_the_key_differences(tmp_path, capsys):
    wrn_like = tmp_path / "wrn.pth"
    save_checkpoint(wrn_like, {"conv1.weight": torch.zeros(16, 3, 3, 3), "conv1.bias": torch.zeros(16),
                               "bn1.weight": torch.ones(640)}, kind="backbone", model_type="wrn28")
    with pytest.raises(SystemExit) as exit_:
        run_proto.main(["--features", "fresh", "--init_weights", str(wrn_like), "--device", "cpu",
                        "--run_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    line = error_line(capsys)
    assert f"{wrn_like}: the checkpoint does not fit ResNet12" in line
    assert "missing: layer1.0.conv1.weight" in line and "3 unexpected: conv1.weight, conv1.bias, bn1.weight" in line
    assert "Is it for another architecture" in line


# ------------------------------------------------------------------------------------------ raw data
@pytest.mark.parametrize("dataset, present, missing", [
    ("tiered", ["train_images_png.pkl", "train_labels.pkl", "val_images_png.pkl", "val_labels.pkl",
                "test_images_png.pkl"], "test_labels.pkl"),
    ("cifar_fs", ["CIFAR_FS_train.pickle", "CIFAR_FS_test.pickle"], "CIFAR_FS_val.pickle"),
    ("cub", [], "classes.txt"),
])
def test_raw_folder_missing_a_split_file_is_named_before_writing(dataset, present, missing, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in present:
        (raw / name).write_bytes(pickle.dumps({}))
    (tmp_path / "glove.txt").write_text("owl 0 0 1\n")
    argv = [dataset, "--raw", str(raw), "--out", str(tmp_path / "out")]
    assert prepare.main(argv + ([] if dataset == "cub" else ["--glove", str(tmp_path / "glove.txt")])) == 2
    assert f"error: {raw / missing} not found." in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_malformed_glove_lines_are_skipped_and_counted_by_the_prepare_command(tmp_path, caplog):
    raw = make_tiny_mini(tmp_path / "raw")
    with open(raw / "glove.txt", "a") as glove:
        # too few fields; a value that is not a number (on a word that is looked up); too few values
        glove.write("a-token-without-vector\nowl 1 x 3\nshort 1 2\n")
    with caplog.at_level(logging.WARNING):
        assert prepare.main(mini_args(raw, tmp_path / "out")) == 0
    assert "glove.txt: skipped 3 malformed line(s)" in caplog.text


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("flags, message", [
    (["--setting", "tran", "--way", "1"], "--setting tran clusters the queries into k = way clusters and needs "
                                          "--way >= 2, got --way 1."),
    (["--resume", "--eval_weights", "x.pth"], "--resume continues an interrupted training: pass the --run_dir of "
                                              "that run, and no --eval_weights."),
    (["--shot", "1", "1"], "--shot lists a value twice: [1, 1]."),
    (["--lamda", "auto", "--head", "concat"], "--lamda auto chooses the fusion head's weight; the concat head has "
                                              "no lambda (it concatenates the visual and semantic parts). Drop "
                                              "--lamda auto."),
])
def test_contradictory_meta_flags_get_one_error_line(flags, message, root, tmp_path, capsys):
    assert fusion(root, tmp_path / "run", *flags) == 2
    assert error_line(capsys) == f"error: {message}"


@pytest.mark.parametrize("flags, message", [
    (["--lamda", "1.5"], "argument --lamda: must lie in [0, 1], got 1.5"),
    (["--way", "0"], "argument --way: must be >= 1, got 0"),
    (["--inner_steps", "-1"], "argument --inner_steps: must be >= 0, got -1"),
])
def test_impossible_flag_values_are_named_by_argparse(flags, message, root, tmp_path, capsys):
    assert fusion(root, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err


def test_resume_needs_an_existing_run_folder(root, tiny_image_root, tmp_path, capsys):
    assert fusion(root, tmp_path / "never-ran", "--resume") == 2
    assert error_line(capsys) == (f"error: --resume: run folder {tmp_path / 'never-ran'} not found; pass the --run_dir "
                                  f"of the run to continue.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it_is_refused(root, tmp_path, capsys):
    assert fusion(root, tmp_path / "run", "--device", "cuda") == 2
    assert error_line(capsys) == "error: --device cuda: CUDA is not available on this machine; use --device cpu " \
                                 "or auto."


# ------------------------------------------------------------------------------------------ resources
def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")


def test_out_of_memory_names_the_batch_flag(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(meta, "load_feature_splits", out_of_memory)
    assert fusion(root, tmp_path / "run") == 3
    assert error_line(capsys) == ("error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB "
                                  "(GPU 0; 79.1 GiB total)). Lower --episode_batch, or free the GPU (nvidia-smi "
                                  "shows who holds it).")
    from trainer import pre
    monkeypatch.setattr(pre, "Pretrainer", out_of_memory)
    with pytest.raises(SystemExit) as exit_:
        run_pre.main(["--device", "cpu", "--run_dir", str(tmp_path / "pre")])
    assert exit_.value.code == 3 and "Lower --pre_batch_size" in error_line(capsys)


def peak_rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        clear.write("5")


@pytest.mark.slow
def test_memory_stays_flat_over_2000_reset_episodes():
    """Peak RSS and peak Python allocations while evaluating 2,000 episodes in chunks of 100 stay at their level
    for 200: nothing accumulates per chunk (each chunk gathers 2.5 MB of features: 18 chunks kept alive
    would add 46 MB, the margin is 16 MB)."""
    try:
        reset_peak_rss()
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(20).repeat_interleave(30)
    split = FeatureSplit(torch.rand(600, 640, generator=generator), targets, torch.randn(20, 16, generator=generator))
    config = MetaConfig.from_args(build_parser().parse_args(["--inner_steps", "1"]), shot=1)
    assert (config.inner_state, config.episode_batch) == ("reset", 100)
    model = meta.build_model(config, 640, 16, torch.device("cpu"))
    indices = episode_indices(targets, 5, 1, 1, 2000, seed=0)                  # 5-way 1-shot, 1 query
    meta.evaluate(model, split, indices[:100], config, 1)  # warm-up: allocator pools, lazy initialisation

    def peaks(count: int) -> tuple[int, int]:
        """Peak RSS (kB) and peak traced Python allocations (bytes) while evaluating ``count`` episodes."""
        reset_peak_rss()
        tracemalloc.start()
        accuracies = meta.evaluate(model, split, indices[:count], config, 1)
        python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert accuracies.shape == (count,)
        return peak_rss_kb(), python_peak

    rss_200, python_200 = peaks(200)
    rss_2000, python_2000 = peaks(2000)
    assert rss_2000 <= rss_200 + 16 * 1024, (rss_200, rss_2000)
    assert python_2000 <= python_200 + 256 * 1024, (python_200, python_2000)
