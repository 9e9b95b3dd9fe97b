"""``python -m dataloader.prepare folder``: a folder tree of real JPEGs, class names, the GloVe fallback, and
refusal of bad input naming the file or folder."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloader.prepare import SPLITS, main, to_84
from synthetic_data import mini_class_folders

SEED = 2045


def read_glove(path: Path) -> dict[str, np.ndarray]:
    """An independent reader for the plain (space-free tokens) GloVe files used here."""
    return {word: np.array(values, dtype=np.float64)
            for word, *values in (line.split(" ") for line in path.read_text().splitlines())}


def tiny_tree(raw: Path, classes: int = 2, images: int = 2) -> Path:
    """``raw/<split>/<colour>_<c>/<k>.png``: random 40x60 images, and a 3-d GloVe file knowing ``red`` and ``owl``."""
    rng = np.random.default_rng(0)
    for split in SPLITS:
        for c in range(classes):
            folder = raw / split / ("red-owl" if c == 0 else f"class_{split}{c}")
            folder.mkdir(parents=True)
            for k in range(images):
                Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (raw / "glove.txt").write_text("red 1 2 3\nowl 3 2 1\n")
    return raw


def run(raw: Path, out: Path, *flags: str) -> int:
    return main(["folder", "--raw", str(raw), "--glove", str(raw / "glove.txt"), "--out", str(out), *flags])


def test_folder_of_real_jpegs_prepares_like_the_other_datasets(tmp_path, data_dir, caplog):
    raw = mini_class_folders(tmp_path / "raw", classes=3, images=4)
    (raw / "glove.txt").write_bytes((data_dir / "glove" / "glove.6B.50d.subset.txt").read_bytes())
    (raw / "test" / "king_crab").rename(raw / "test" / "king-crab")
    (raw / "classes.txt").write_text("nematode zzqx_vvqz-kkqx\n")
    (raw / "val" / "goose" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        assert run(raw, tmp_path / "mine", "--way", "3") == 0
    glove = read_glove(raw / "glove.txt")
    out = tmp_path / "mine"
    for split in SPLITS:
        with np.load(out / f"few-shot-{split}.npz") as npz:
            images, targets = npz["features"], npz["targets"]
        classes = [line.split("\t") for line in (out / f"classes-{split}.txt").read_text().splitlines()]
        folders = sorted(p.name for p in (raw / split).iterdir())
        assert [folder for folder, _ in classes] == folders
        files = [path for folder in folders for path in sorted((raw / split / folder).glob("*.jpg"))]
        order = np.random.RandomState(SEED).permutation(len(files))  # the preparers' shuffle
        expected = np.stack([to_84(Image.open(files[i])) for i in order])
        assert images.dtype == np.uint8 and np.array_equal(images, expected)
        assert np.array_equal(targets, np.repeat(np.arange(3), 4)[order])
        with np.load(out / f"few-shot-wordemb-{split}.npz") as npz:
            vectors = npz["features"]
        for (folder, name), vector in zip(classes, vectors):
            found = [glove[word] for word in name.lower().split() if word in glove]
            np.testing.assert_allclose(vector, np.mean(found, axis=0) if found else 0, rtol=1e-6)
    names = dict(line.split("\t") for line in (out / "classes-test.txt").read_text().splitlines())
    assert names == {"golden_retriever": "golden retriever", "king-crab": "king crab",
                     "nematode": "zzqx vvqz kkqx"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "notes.txt" in warnings[0] and "1 of 9 class(es)" in warnings[1] \
        and "test/nematode (zzqx vvqz kkqx)" in warnings[1]


@pytest.mark.parametrize("damage, named", [
    (lambda raw: (raw / "val" / "class_val1" / "1.png").write_bytes(b"not a png"), "val/class_val1/1.png"),
    (lambda raw: shutil.rmtree(raw / "test" / "class_test1") or (raw / "test" / "class_test1").mkdir(),
     "test/class_test1: class folder without images"),
    (lambda raw: (raw / "train" / "extra").mkdir() or (raw / "train" / "extra" / "a.txt").write_text("a"),
     "train/extra: class folder without images"),
    (lambda raw: shutil.rmtree(raw / "train" / "red-owl"), "train: 1 class folder(s); an episode draws --way 2"),
    (lambda raw: (raw / "classes.txt").write_text("class_val1 Some name\nclass_typo x\n"),
     "classes.txt: no class folder named class_typo"),
    (lambda raw: (raw / "test").rename(raw / "tests"), "test: folder not found"),
])
def test_bad_folder_input_is_refused_naming_it_without_traceback(tmp_path, capsys, damage, named):
    raw = tiny_tree(tmp_path / "raw")
    damage(raw)
    assert run(raw, tmp_path / "out", "--way", "2") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_names_from_folders_and_zero_vectors_for_unknown_words(tmp_path):
    raw = tiny_tree(tmp_path / "raw")
    assert run(raw, tmp_path / "out", "--way", "2") == 0
    assert (tmp_path / "out" / "classes-val.txt").read_text() == "class_val1\tclass val1\nred-owl\tred owl\n"
    with np.load(tmp_path / "out" / "few-shot-wordemb-val.npz") as npz:
        np.testing.assert_allclose(npz["features"], [[0, 0, 0], [2, 2, 2]])
