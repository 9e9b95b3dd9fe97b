"""GloVe word vectors: stream the canonical text file, keep only the words asked for.

The paper uses ``glove.840B.300d.txt`` (2 GB, 2.2 M lines), so the file is read line by line and never held
whole; the dimension D is taken from the file (the first well-formed line), never assumed.

File format: one ``token v1 ... vD`` per line, single spaces. Some 840B tokens contain spaces themselves
(``". . ."``), so a line is parsed from the right: the last D fields are the vector, everything before them is
the token.

Malformed lines (too few fields; a value that is not a finite float) are skipped, counted and reported in one
warning. To keep a 2 GB pass fast, the "too few fields" test runs on every line (a byte count), while the
values are parsed, and so checked, only on lines whose token is kept.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from utils import InputError

log = logging.getLogger(__name__)

FALLBACKS = ("zeros", "uniform")


@dataclass
class GloveVectors:
    """Word vectors read from a GloVe file.

    Attributes:
        vectors: token -> (D,) float32 vector (only the tokens that were asked for, when a vocabulary was given).
        dim: D, the number of values per line of the file.
        skipped_lines: malformed lines that were skipped.
    """

    vectors: dict[str, np.ndarray]
    dim: int
    skipped_lines: int


def vocabulary(names: Iterable[Iterable[str]]) -> set[str]:
    """Every word of ``names`` as given and lower-cased: the tokens :func:`class_vectors` may look up."""
    return {form for words in names for word in words for form in (word, word.lower())}


def _parse_vector(fields: list[bytes]) -> np.ndarray | None:
    """(D,) float32 vector from D byte strings, or None when a value is not a finite float."""
    try:
        vector = np.array(fields, dtype=np.float32)
    except ValueError:
        return None
    return vector if np.isfinite(vector).all() else None


def _first_vector(line: bytes) -> tuple[str, np.ndarray] | None:
    """Token and vector of a line that may fix D: at least two fields, all but the first finite floats.

    The token is taken to be the first field here: a token with spaces cannot be told apart from a short
    vector before D is known, so such a first line is counted as malformed.
    """
    fields = line.split(b" ")
    if len(fields) < 2:
        return None
    vector = _parse_vector(fields[1:])
    if vector is None:
        return None
    try:
        return fields[0].decode("utf-8"), vector
    except UnicodeDecodeError:
        return None


def load_glove(path: str | os.PathLike, vocabulary: set[str] | None = None) -> GloveVectors:
    """Read a GloVe text file, keeping only the tokens in ``vocabulary`` (all tokens when None).

    Args:
        path: the ``.txt`` file (e.g. ``glove.840B.300d.txt``).
        vocabulary: tokens to keep; pass :func:`vocabulary` of the class names.

    Returns:
        The kept vectors (first occurrence of a token wins), D, and the number of malformed lines skipped.

    Raises:
        InputError: the file is missing or has no well-formed line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: GloVe file not found. Pass --glove with the path of a GloVe text file "
                         f"such as glove.840B.300d.txt.")
    wanted = None if vocabulary is None else {word.encode("utf-8") for word in vocabulary}
    vectors: dict[str, np.ndarray] = {}
    dim = 0
    skipped = 0
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"reading {path.name}") as progress:
        pending_bytes = 0
        for raw in f:
            pending_bytes += len(raw)
            if pending_bytes > 1 << 22:  # a tqdm update per line would cost more than the parsing
                progress.update(pending_bytes)
                pending_bytes = 0
            line = raw.rstrip()  # the newline, and any trailing blanks a converter may have left
            if not line:
                continue
            if dim == 0:
                parsed = _first_vector(line)
                if parsed is None:
                    skipped += 1
                    continue
                token, vector = parsed
                dim = vector.size
                if wanted is None or token.encode("utf-8") in wanted:
                    vectors[token] = vector
                continue
            # Cheap test on every line: a token plus D values needs at least D separators.
            if line.count(b" ") < dim:
                skipped += 1
                continue
            # Wanted tokens never contain spaces (they are words of class names), so the first field
            # decides whether the line is worth parsing; the full parse below then confirms the token.
            if wanted is not None and line[:line.find(b" ")] not in wanted:
                continue
            parts = line.rsplit(b" ", dim)
            token_bytes, vector = parts[0], _parse_vector(parts[1:])
            if vector is None:
                skipped += 1
                continue
            try:
                token = token_bytes.decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            if (wanted is None or token_bytes in wanted) and token not in vectors:
                vectors[token] = vector
        progress.update(pending_bytes)
    if dim == 0:
        raise InputError(f"{path}: no well-formed GloVe line ('token v1 ... vD', space-separated floats) "
                         f"in {skipped} non-empty line(s). Is this a GloVe text file?")
    if skipped:
        log.warning("%s: skipped %d malformed line(s) (too few fields or non-float values; D = %d)",
                    path, skipped, dim)
    log.info("%s: D = %d, kept %d vector(s)", path.name, dim, len(vectors))
    return GloveVectors(vectors=vectors, dim=dim, skipped_lines=skipped)


def _lookup(word: str, glove: GloveVectors) -> np.ndarray | None:
    """The vector of ``word`` as given, else of its lower-cased form, else None."""
    vector = glove.vectors.get(word)
    return vector if vector is not None else glove.vectors.get(word.lower())


def class_vectors(names: list[list[str]], glove: GloveVectors, fallback: str,
                  rng: np.random.RandomState | None = None,
                  class_ids: list[str] | None = None) -> np.ndarray:
    """Semantic vector of every class: the mean of the GloVe vectors of its words that GloVe has.

    Args:
        names: C lists of words, one list per class, in label order.
        glove: vectors from :func:`load_glove`.
        fallback: for a class none of whose words is found: ``"zeros"`` (miniImageNet) or ``"uniform"``
            (U(-1, 1) drawn from ``rng``; tieredImageNet, CIFAR-FS). One warning lists every such class.
        rng: source of the uniform draws; ``np.random.RandomState(2045)`` when None.
        class_ids: C ids used in the log messages (defaults to the label numbers).

    Returns:
        (C, D) float32.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if class_ids is None:
        class_ids = [str(label) for label in range(len(names))]
    if len(class_ids) != len(names):
        raise ValueError(f"{len(class_ids)} class ids for {len(names)} class names")
    rng = np.random.RandomState(2045) if rng is None else rng
    out = np.zeros((len(names), glove.dim), dtype=np.float32)
    unknown = []
    for label, (words, class_id) in enumerate(zip(names, class_ids)):
        looked_up = [(word, _lookup(word, glove)) for word in words]
        found = [vector for _, vector in looked_up if vector is not None]
        missing = [word for word, vector in looked_up if vector is None]
        if missing:
            log.info("class %s (%s): word(s) not in GloVe: %s", class_id, " ".join(words), ", ".join(missing))
        if found:
            # Mean in float64 so that the result does not depend on the order of summation in float32.
            out[label] = np.mean(np.stack(found).astype(np.float64), axis=0)
        else:
            unknown.append(f"{class_id} ({' '.join(words)})")
            if fallback == "uniform":
                out[label] = rng.uniform(-1.0, 1.0, size=glove.dim)
    if unknown:
        log.warning("%d of %d class(es) have no word in GloVe and get %s vectors: %s", len(unknown), len(names),
                    "zero" if fallback == "zeros" else "uniform(-1, 1)", ", ".join(unknown))
    return out
