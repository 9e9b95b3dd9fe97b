"""GloVe reading (tokens with spaces, malformed lines, D from the file) and class vectors."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from dataloader.glove import GloveVectors, class_vectors, load_glove, vocabulary
from utils import InputError


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_tokens_with_spaces_and_dimension_from_file(tmp_path):
    path = write_lines(tmp_path / "g.txt", ["the 1 2 3 4", ". . . 5 6 7 8", "new york -1 0.5 2e-1 3",
                                            "\u00a0 9 9 9 9"])
    glove = load_glove(path)
    assert glove.dim == 4 and glove.skipped_lines == 0
    assert set(glove.vectors) == {"the", ". . .", "new york", "\u00a0"}
    np.testing.assert_array_equal(glove.vectors["new york"], np.array([-1, 0.5, 0.2, 3], np.float32))
    assert all(v.dtype == np.float32 and v.shape == (4,) for v in glove.vectors.values())


def test_malformed_lines_are_skipped_counted_and_reported(tmp_path, caplog):
    path = write_lines(tmp_path / "g.txt", [
        "header-without-values",  # before D is known: malformed, and D comes from the next line
        "cat 1 2 3",
        "dog 1 2",  # too few fields
        "fox 1 x 3",  # not a float
        "owl 1 nan 3",  # not finite
        "",  # blank lines are not lines of data
        "bee 4 5 6",
        "cat 7 7 7",  # a repeated token: the first occurrence wins
    ])
    with caplog.at_level(logging.WARNING):
        glove = load_glove(path)
    assert glove.dim == 3 and glove.skipped_lines == 4
    assert set(glove.vectors) == {"cat", "bee"}
    np.testing.assert_array_equal(glove.vectors["cat"], [1, 2, 3])
    assert any("skipped 4 malformed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_vocabulary_keeps_only_requested_words(tmp_path):
    path = write_lines(tmp_path / "g.txt", ["a 1 2", "b 3 4", "b c 5 6", "short 1", "Dog 7 8"])
    glove = load_glove(path, vocabulary={"b", "Dog", "zzz"})
    assert set(glove.vectors) == {"b", "Dog"}  # "b c" starts like "b" but is another token
    np.testing.assert_array_equal(glove.vectors["b"], [3, 4])
    assert glove.skipped_lines == 1  # too-few-fields lines are counted even when their word is not wanted


def test_missing_file_and_file_without_vectors_are_refused(tmp_path):
    with pytest.raises(InputError, match="nope.txt"):
        load_glove(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="empty.txt"):
        load_glove(write_lines(tmp_path / "empty.txt", ["just words here", "and more"]))


def test_vocabulary_has_given_and_lower_cased_forms():
    assert vocabulary([["Aramus", "pictus"], ["goldfish"]]) == {"Aramus", "aramus", "pictus", "goldfish"}


def make_glove() -> GloveVectors:
    vectors = {"red": [1.0, 0.0, 2.0], "fox": [3.0, 4.0, 0.0], "aramus": [0.5, 0.5, 0.5], "Snoek": [9, 9, 9]}
    return GloveVectors({k: np.array(v, np.float32) for k, v in vectors.items()}, dim=3, skipped_lines=0)


def test_class_vectors_average_found_words_and_fall_back(caplog):
    glove = make_glove()
    names = [["red", "fox"], ["Aramus", "pictus"], ["Snoek"], ["kuvasz"]]
    with caplog.at_level(logging.INFO):
        out = class_vectors(names, glove, "zeros", class_ids=["n1", "n2", "n3", "n4"])
    assert out.dtype == np.float32 and out.shape == (4, 3)
    np.testing.assert_allclose(out[0], [2.0, 2.0, 1.0])  # mean of red and fox
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.5])  # "Aramus" found lower-cased, "pictus" missing
    np.testing.assert_allclose(out[2], [9, 9, 9])  # found as given
    np.testing.assert_array_equal(out[3], 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "n4" in warnings[0] and "kuvasz" in warnings[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("n2" in m and "pictus" in m for m in infos)


def test_uniform_fallback_draws_from_the_given_generator():
    glove = make_glove()
    out = class_vectors([["kuvasz"], ["red"], ["komondor"]], glove, "uniform", rng=np.random.RandomState(7))
    expected = np.random.RandomState(7).uniform(-1, 1, size=(2, 3)).astype(np.float32)
    np.testing.assert_array_equal(out[[0, 2]], expected)
    with pytest.raises(ValueError, match="fallback"):
        class_vectors([["red"]], glove, "gaussian")


def test_real_glove_subset_reads_as_50_d_without_skipped_lines(data_dir):
    glove = load_glove(data_dir / "glove" / "glove.6B.50d.subset.txt", vocabulary={"the", "kit", "fox"})
    assert glove.dim == 50 and glove.skipped_lines == 0 and set(glove.vectors) == {"the", "kit", "fox"}
