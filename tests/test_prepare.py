"""Raw-data preparation: the real mini/CUB cuts, tiny raw files in the tiered and CIFAR release formats,
and refusal of bad input."""
from __future__ import annotations

import csv
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataloader.prepare import CIFAR100_FINE_NAMES, SPLITS, load_pickle, main, prepare, to_84, write_split
from synthetic_data import make_tiny_mini, mini_args
from utils import InputError

SEED = 2045


# ------------------------------------------------------------------------------------------------ helpers


def load_split(folder: Path, split: str, with_images: bool = True):
    """(images, targets, vectors, [(class id, name)]) of a prepared split; images None unless asked for."""
    with np.load(folder / f"few-shot-{split}.npz") as npz:
        images, targets = npz["features"] if with_images else None, npz["targets"]
    with np.load(folder / f"few-shot-wordemb-{split}.npz") as npz:
        vectors = npz["features"]
    classes = [tuple(line.split("\t")) for line in (folder / f"classes-{split}.txt").read_text().splitlines()]
    return images, targets, vectors, classes


def read_glove(path: Path) -> dict[str, np.ndarray]:
    """An independent reader for the plain (space-free tokens) GloVe files used here."""
    vectors = {}
    for line in path.read_text().splitlines():
        word, *values = line.split(" ")
        vectors.setdefault(word, np.array(values, dtype=np.float64))
    return vectors


def mean_vector(words: list[str], glove: dict[str, np.ndarray]) -> np.ndarray | None:
    found = [glove[w] if w in glove else glove[w.lower()] for w in words if w in glove or w.lower() in glove]
    return np.mean(found, axis=0) if found else None


def png_bytes(array: np.ndarray) -> np.ndarray:
    """PNG encoding as the tieredImageNet release stores it: a 1-D uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def dump_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))  # protocol 2: what Python 2 could write


def resized(array: np.ndarray) -> np.ndarray:
    """The prepared image, written out with PIL directly: centre square crop, bilinear resize to 84."""
    image = Image.fromarray(array).convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.crop(box).resize((84, 84), Image.Resampling.BILINEAR))


def check_layout(folder: Path, split: str, num_images: int, num_classes: int, dim: int):
    images, targets, vectors, classes = load_split(folder, split)
    assert images.shape == (num_images, 84, 84, 3) and images.dtype == np.uint8
    assert targets.shape == (num_images,) and targets.dtype == np.int64
    assert vectors.shape == (num_classes, dim) and vectors.dtype == np.float32
    assert len(classes) == num_classes and sorted(set(targets.tolist())) == list(range(num_classes))
    return images, targets, vectors, classes


# ------------------------------------------------------------------------------------ miniImageNet (real)

MINI_COUNTS = {"train": (7680, 64), "val": (1920, 16), "test": (2400, 20)}


def read_mini_csv(raw: Path, split: str) -> list[tuple[str, str]]:
    with open(raw / f"{split}.csv", newline="") as f:
        return [tuple(row) for row in list(csv.reader(f))[1:]]


@pytest.mark.parametrize("split", SPLITS)
def test_mini_layout_and_class_order(prepared_mini, data_dir, split):
    num_images, num_classes = MINI_COUNTS[split]
    _, targets, _, classes = check_layout(prepared_mini / "mini", split, num_images, num_classes, 50)
    assert (np.bincount(targets) == 120).all()
    wnids = sorted({wnid for _, wnid in read_mini_csv(data_dir / "mini-imagenet", split)})
    assert [class_id for class_id, _ in classes] == wnids


def test_mini_class_vectors_are_glove_means(prepared_mini, data_dir):
    glove = read_glove(data_dir / "glove" / "glove.6B.50d.subset.txt")
    zero_classes = 0
    for split in SPLITS:
        _, _, vectors, classes = load_split(prepared_mini / "mini", split, with_images=False)
        for row, (wnid, name) in zip(vectors, classes):
            expected = mean_vector(name.lower().split("_"), glove)
            if expected is None:
                zero_classes += 1
                np.testing.assert_array_equal(row, 0, err_msg=f"{wnid} {name}")
            else:
                np.testing.assert_allclose(row, expected, rtol=1e-6, atol=1e-6, err_msg=f"{wnid} {name}")
    assert zero_classes == 1  # komondor: the one miniImageNet name GloVe 6B lacks


def test_mini_images_match_the_source_jpegs(prepared_mini, data_dir):
    raw = data_dir / "mini-imagenet"
    for split in ("train", "test"):
        rows = read_mini_csv(raw, split)
        images, targets, _, classes = load_split(prepared_mini / "mini", split)
        order = np.random.RandomState(SEED).permutation(len(rows))
        wnids = [class_id for class_id, _ in classes]
        for slot in (0, 1, len(rows) - 1):
            filename, wnid = rows[order[slot]]
            source = np.asarray(Image.open(raw / "images" / filename).convert("RGB"))
            np.testing.assert_array_equal(images[slot], source)
            assert wnids[targets[slot]] == wnid


# --------------------------------------------------------------------------------------------- CUB (real)


@pytest.mark.slow
def test_cub_attributes_and_split_by_official_id(prepared_cub, data_dir):
    raw = data_dir / "cub" / "CUB_200_2011"
    attributes = np.loadtxt(raw / "attributes" / "class_attribute_labels_continuous.txt")
    present = sorted(int(p.name[:3]) for p in (raw / "images").iterdir() if p.is_dir())
    rule = {"train": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "test": lambda i: i % 4 == 3}
    for split in SPLITS:
        ids = [i for i in present if rule[split](i - 1)]
        _, targets, vectors, classes = check_layout(prepared_cub / "cub", split, 20 * len(ids), len(ids), 312)
        assert [int(class_id) for class_id, _ in classes] == ids
        np.testing.assert_allclose(vectors, attributes[[i - 1 for i in ids]], rtol=1e-6)


def make_tiny_cub(root: Path, present: list[int], num_classes: int = 8, dim: int = 5) -> Path:
    """A CUB_200_2011-style folder with ``num_classes`` classes, images only for the ``present`` ids."""
    raw = root / "CUB_200_2011"
    (raw / "attributes").mkdir(parents=True)
    (raw / "classes.txt").write_text("".join(f"{i} {i:03d}.Bird_{i}\n" for i in range(1, num_classes + 1)))
    table = np.arange(num_classes * dim, dtype=np.float64).reshape(num_classes, dim)
    np.savetxt(raw / "attributes" / "class_attribute_labels_continuous.txt", table)
    rng = np.random.RandomState(0)
    for i in present:
        folder = raw / "images" / f"{i:03d}.Bird_{i}"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.randint(0, 256, (50 + k, 70, 3), dtype=np.uint8)).save(folder / f"b{k}.png")
    return raw


def test_cub_missing_classes_one_warning_and_rows_by_official_id(tmp_path, caplog):
    raw = make_tiny_cub(tmp_path, present=[1, 2, 4, 5, 6, 8])  # 3 and 7 have no images
    with caplog.at_level(logging.WARNING):
        assert main(["cub", "--raw", str(raw), "--out", str(tmp_path / "cub")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 8" in warnings[0] and "003.Bird_3" in warnings[0] \
        and "007.Bird_7" in warnings[0]
    expected_ids = {"train": [1, 5], "val": [2, 6], "test": [4, 8]}
    for split, ids in expected_ids.items():
        _, _, vectors, classes = check_layout(tmp_path / "cub", split, 4, 2, 5)
        assert classes == [(f"{i:03d}", f"Bird_{i}") for i in ids]
        np.testing.assert_array_equal(vectors, np.arange(40).reshape(8, 5)[[i - 1 for i in ids]])


def test_cub_attribute_table_of_wrong_shape_is_refused(tmp_path):
    raw = make_tiny_cub(tmp_path, present=[1, 2, 4])
    path = raw / "attributes" / "class_attribute_labels_continuous.txt"
    np.savetxt(path, np.zeros((7, 5)))
    with pytest.raises(InputError, match="class_attribute_labels_continuous.txt: expected one row per class"):
        prepare("cub", raw, tmp_path / "cub")


# ------------------------------------------------------------------------- tieredImageNet (release format)

# Classes of each split by wnid, listed in release-label order; the names come from the real data's words.txt.
TIERED_CLASSES = {
    "train": ["n02013706", "n01530575", "n02091635"],  # limpkin, brambling (no GloVe word), otterhound
    "val": ["n03016953", "n02099267"],  # chiffonier (no GloVe word), flat-coated retriever
    "test": ["n02281787", "n02514041", "n02104029"],  # lycaenid, barracouta, kuvasz (no GloVe word)
}


def make_tiny_tiered(raw: Path, data: Path) -> dict:
    """``<split>_images_png.pkl`` + ``<split>_labels.pkl`` with 3 random images per class; returns the images."""
    words = dict(line.split("\t") for line in (data / "tiered-imagenet" / "words.txt").read_text().splitlines())
    rng = np.random.RandomState(1)
    images = {}
    for split, wnids in TIERED_CLASSES.items():
        listed = {line.split(",")[0] for line in (data / "tiered-imagenet" / f"{split}.csv").read_text().split()}
        assert set(wnids) <= listed
        labels = rng.permutation(np.repeat(np.arange(len(wnids)), 3))
        images[split] = [rng.randint(0, 256, (84, 84, 3), dtype=np.uint8) for _ in labels]
        images[split][-1] = rng.randint(0, 256, (90, 100, 3), dtype=np.uint8)  # one not yet 84x84
        dump_pickle(raw / f"{split}_images_png.pkl", [png_bytes(a) for a in images[split]])
        dump_pickle(raw / f"{split}_labels.pkl", {
            "label_specific": labels, "label_specific_str": [words[w] for w in wnids],
            "label_general": np.zeros_like(labels), "label_general_str": ["whatever"]})
    return images


def test_tiered_release_pickles_prepare_in_release_order_with_glove_or_uniform_vectors(tmp_path, data_dir):
    sources = make_tiny_tiered(tmp_path / "raw", data_dir)
    glove_path = data_dir / "glove" / "glove.6B.50d.subset.txt"
    assert main(["tiered", "--raw", str(tmp_path / "raw"), "--glove", str(glove_path),
                 "--out", str(tmp_path / "tiered")]) == 0
    glove = read_glove(glove_path)
    expected_words = {  # the second synonym for limpkin, otterhound, barracouta, lycaenid
        "limpkin, Aramus pictus": ["Aramus", "pictus"], "otterhound, otter hound": ["otter", "hound"],
        "lycaenid, lycaenid butterfly": ["lycaenid", "butterfly"], "barracouta, snoek": ["snoek"],
        "flat-coated retriever": ["flat-coated", "retriever"]}
    uniform_rows = []
    for split, wnids in TIERED_CLASSES.items():
        num_classes = len(wnids)
        images, targets, vectors, classes = check_layout(tmp_path / "tiered", split, 3 * num_classes,
                                                         num_classes, 50)
        assert [class_id for class_id, _ in classes] == [str(c) for c in range(num_classes)]  # release order
        for row, (_, name) in zip(vectors, classes):
            if name in expected_words:
                np.testing.assert_allclose(row, mean_vector(expected_words[name], glove), rtol=1e-6, atol=1e-6)
            else:  # brambling, chiffonier, kuvasz: no word in GloVe -> U(-1, 1)
                assert np.abs(row).max() <= 1 and np.abs(row).min() > 0
                uniform_rows.append(row)
        with open(tmp_path / "raw" / f"{split}_labels.pkl", "rb") as f:
            raw_labels = pickle.load(f)["label_specific"]
        order = np.random.RandomState(SEED).permutation(len(raw_labels))
        np.testing.assert_array_equal(targets, raw_labels[order])
        for slot in range(len(order)):
            np.testing.assert_array_equal(images[slot], resized(sources[split][order[slot]]))
    assert len(uniform_rows) == 3 and len({row.tobytes() for row in uniform_rows}) == 3


def test_tiered_bgr_is_rgb_with_the_channel_axis_reversed(tmp_path, data_dir):
    """``--channel_order bgr`` stores what the original's cv2.imdecode gave; the default stays RGB."""
    sources = make_tiny_tiered(tmp_path / "raw", data_dir)
    common = ["tiered", "--raw", str(tmp_path / "raw"),
              "--glove", str(data_dir / "glove" / "glove.6B.50d.subset.txt")]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert main([*common, "--out", str(tmp_path / "bgr"), "--channel_order", "bgr"]) == 0
    for split in SPLITS:
        rgb_images, rgb_targets, rgb_vectors, rgb_classes = load_split(tmp_path / "default", split)
        bgr_images, bgr_targets, bgr_vectors, bgr_classes = load_split(tmp_path / "bgr", split)
        np.testing.assert_array_equal(bgr_images, rgb_images[..., ::-1])
        np.testing.assert_array_equal(bgr_targets, rgb_targets)
        np.testing.assert_array_equal(bgr_vectors, rgb_vectors)
        assert bgr_classes == rgb_classes
        first = np.random.RandomState(SEED).permutation(len(rgb_targets))[0]
        np.testing.assert_array_equal(rgb_images[0], resized(sources[split][first]))  # default: RGB


def test_channel_order_bgr_is_refused_for_other_datasets(tmp_path, capsys):
    assert main(["mini", "--raw", str(tmp_path), "--glove", str(tmp_path / "g.txt"),
                 "--channel_order", "bgr"]) == 2
    assert "--channel_order bgr applies to tiered only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- CIFAR-FS


def cifar_split_classes(data: Path) -> dict[str, list[str]]:
    return {split: [c for _, c in json.loads((data / "cifar-fs" / f"{split}.json").read_text())]
            for split in SPLITS}


def test_builtin_cifar100_names_are_the_fine_labels_in_id_order(data_dir):
    names = [c for classes in cifar_split_classes(data_dir).values() for c in classes]
    assert len(CIFAR100_FINE_NAMES) == 100 and set(CIFAR100_FINE_NAMES) == set(names)
    assert list(CIFAR100_FINE_NAMES) == sorted(CIFAR100_FINE_NAMES)  # CIFAR-100 ids are alphabetical


def glove_without(path: Path, out: Path, dropped: set[str]) -> Path:
    """A copy of a GloVe file without the lines of ``dropped``, to force the uniform fallback."""
    out.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                           if line.split(" ", 1)[0] not in dropped))
    return out


def check_cifar_output(folder: Path, split_classes, raw_ids, raw_images, glove):
    """Check every split against the raw samples (fine ids, 32x32 images) in their raw order."""
    for split, classes in split_classes.items():
        mask = np.isin(raw_ids, [CIFAR100_FINE_NAMES.index(c) for c in classes])
        ids, pixels = raw_ids[mask], raw_images[mask]
        images, targets, vectors, table = check_layout(folder, split, len(ids), len(classes), 50)
        names = sorted(classes)
        assert [class_id for class_id, _ in table] == names
        order = np.random.RandomState(SEED).permutation(len(ids))
        assert [names[t] for t in targets] == [CIFAR100_FINE_NAMES[i] for i in ids[order]]
        for slot in (0, len(ids) - 1):
            np.testing.assert_array_equal(images[slot], resized(pixels[order[slot]]))
        for row, name in zip(vectors, names):
            expected = mean_vector(name.split("_"), glove)
            if expected is None:
                assert name == "dolphin" and np.abs(row).max() <= 1 and np.abs(row).min() > 0
            else:
                np.testing.assert_allclose(row, expected, rtol=1e-6, atol=1e-6)


def test_cifar_fs_release_pickles_prepare_every_split_in_raw_order(tmp_path, data_dir):
    split_classes = cifar_split_classes(data_dir)
    glove_path = glove_without(data_dir / "glove" / "glove.6B.50d.subset.txt", tmp_path / "g.txt", {"dolphin"})
    rng = np.random.RandomState(2)
    all_ids, all_images = [], []
    for split, classes in split_classes.items():
        ids = rng.permutation(np.repeat([CIFAR100_FINE_NAMES.index(c) for c in classes], 2))
        images = rng.randint(0, 256, (len(ids), 32, 32, 3), dtype=np.uint8)
        dump_pickle(tmp_path / "raw" / f"CIFAR_FS_{split}.pickle", {"data": images, "labels": ids.tolist()})
        all_ids.append(ids)
        all_images.append(images)
    assert main(["cifar_fs", "--raw", str(tmp_path / "raw"), "--glove", str(glove_path),
                 "--out", str(tmp_path / "cifar_fs")]) == 0
    check_cifar_output(tmp_path / "cifar_fs", split_classes, np.concatenate(all_ids),
                       np.concatenate(all_images), read_glove(glove_path))


def test_cifar_fs_from_cifar100_python_follows_the_split_lists(tmp_path, data_dir):
    glove_path = glove_without(data_dir / "glove" / "glove.6B.50d.subset.txt", tmp_path / "g.txt", {"dolphin"})
    folder = tmp_path / "raw" / "cifar-100-python"
    dump_pickle(folder / "meta", {"fine_label_names": list(CIFAR100_FINE_NAMES), "coarse_label_names": []})
    rng = np.random.RandomState(3)
    parts = {}
    for part, per_class in (("train", 2), ("test", 1)):
        ids = rng.permutation(np.repeat(np.arange(100), per_class))
        rows = rng.randint(0, 256, (len(ids), 3072), dtype=np.uint8)
        dump_pickle(folder / part, {"data": rows, "fine_labels": ids.tolist(), "coarse_labels": [0] * len(ids)})
        parts[part] = (ids, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert main(["cifar_fs", "--raw", str(tmp_path / "raw"), "--glove", str(glove_path),
                 "--split_dir", str(data_dir / "cifar-fs"), "--out", str(tmp_path / "cifar_fs")]) == 0
    # A split's raw order: the CIFAR-100 train images of its classes, then its test images.
    check_cifar_output(tmp_path / "cifar_fs", cifar_split_classes(data_dir),
                       np.concatenate([parts["train"][0], parts["test"][0]]),
                       np.concatenate([parts["train"][1], parts["test"][1]]), read_glove(glove_path))
    _, targets, _, _ = load_split(tmp_path / "cifar_fs", "val", with_images=False)
    assert (np.bincount(targets) == 3).all()  # 2 train + 1 test image per class


# ------------------------------------------------------------------------------------------------ pickles

# What Python 2 + NumPy 1 wrote for np.array([1, 255, 3], dtype=np.uint8) with protocol 2: ``numpy.core``
# module names and the array bytes as a Python 2 str (SHORT_BINSTRING).
PY2_ARRAY_PICKLE = (
    b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02U\x01bq\x03"
    b"\x87q\x04Rq\x05(K\x01K\x03\x85q\x06cnumpy\ndtype\nq\x07U\x02u1q\x08K\x00K\x01\x87q\x09Rq\x0a(K\x03"
    b"U\x01|q\x0bNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0cb\x89U\x03\x01\xff\x03q\x0dtq\x0eb.")


def test_python2_pickles_load_and_pickled_code_is_refused(tmp_path):
    (tmp_path / "py2.pkl").write_bytes(PY2_ARRAY_PICKLE)
    loaded = load_pickle(tmp_path / "py2.pkl")
    assert loaded.dtype == np.uint8 and loaded.tolist() == [1, 255, 3]
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(InputError, match="evil.pkl.*refusing to load os.system"):
        load_pickle(tmp_path / "evil.pkl")


# -------------------------------------------------------------------------------- image resizing, bad input


def test_to_84_crops_the_centre_square_and_keeps_84x84():
    wide = np.zeros((60, 100, 3), dtype=np.uint8)
    wide[:, 20:80] = 255  # the centre 60x60 square is all white: the black margins must be cropped away
    assert (to_84(Image.fromarray(wide)) == 255).all()
    exact = np.random.RandomState(0).randint(0, 256, (84, 84, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_84(Image.fromarray(exact)), exact)
    gray = to_84(Image.fromarray(np.full((40, 30), 7, dtype=np.uint8)))
    assert gray.shape == (84, 84, 3) and (gray == 7).all()


def test_write_split_accepts_plain_names_and_checks_shapes(tmp_path):
    images = np.zeros((3, 84, 84, 3), dtype=np.uint8)
    write_split(tmp_path, "val", images, np.array([1, 0, 1]), np.ones((2, 4)), ["red fox", "owl"])
    _, targets, vectors, classes = check_layout(tmp_path, "val", 3, 2, 4)
    assert classes == [("red fox", "red fox"), ("owl", "owl")] and targets.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="every label"):
        write_split(tmp_path, "val", images, np.array([0, 0, 0]), np.ones((2, 4)), ["red fox", "owl"])
    with pytest.raises(ValueError, match="uint8"):
        write_split(tmp_path, "val", images[:, :32, :32], np.array([1, 0, 1]), np.ones((2, 4)), ["a", "b"])


def test_mini_from_zip_equals_mini_from_folder(tmp_path):
    for layout in ("folder", "zip"):
        raw = make_tiny_mini(tmp_path / layout, zipped=layout == "zip")
        assert main(mini_args(raw, tmp_path / f"out-{layout}")) == 0
    for split in SPLITS:
        folder, zipped = load_split(tmp_path / "out-folder", split), load_split(tmp_path / "out-zip", split)
        for a, b in zip(folder, zipped):
            np.testing.assert_array_equal(a, b)
    _, _, vectors, classes = load_split(tmp_path / "out-zip", "val")
    assert classes == [("n010", "owl"), ("n011", "Red_fox")]
    np.testing.assert_allclose(vectors, [[0, 0, 1], [2, 2, 2]])


@pytest.mark.parametrize("damage, message", [
    (lambda raw: (raw / "val.csv").unlink(), "val.csv not found"),
    (lambda raw: (raw / "images" / "n02000000001.jpg").unlink(), "n02000000001.jpg"),
    (lambda raw: (raw / "images" / "n01000000002.jpg").write_bytes(b"not a jpeg"), "n01000000002.jpg"),
    (lambda raw: (raw / "mini_imagenet_class_label_dict3.txt").write_text("n000 1 owl\n"),
     "dict3.txt: no name for wnid"),
    (lambda raw: (raw / "glove.txt").unlink(), "glove.txt not found"),
])
def test_bad_mini_input_is_refused_naming_the_file(tmp_path, damage, message):
    raw = make_tiny_mini(tmp_path / "raw")
    damage(raw)
    with pytest.raises(InputError, match=message):
        prepare("mini", raw, tmp_path / "out", glove=raw / "glove.txt")


def test_command_line_reports_input_errors_without_traceback(tmp_path, capsys):
    raw = make_tiny_mini(tmp_path / "raw")
    (raw / "test.csv").unlink()
    assert main(mini_args(raw, tmp_path / "out")) == 2
    stderr = capsys.readouterr().err
    assert "test.csv not found" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
