"""The embedded ``demo`` dataset: coloured, patterned shapes named by the words that describe them.

A fresh clone has no benchmark data, so this module draws one, deterministically and offline, in the format
of the prepared benchmarks::

    <out>/few-shot-{train,val,test}.npz          features uint8 (N, 84, 84, 3), targets int64 0..C-1
    <out>/few-shot-wordemb-{train,val,test}.npz  features float32 (C, 50), row c = class c's vector
    <out>/classes-{train,val,test}.txt           line c: "<name><TAB><name>" of label c (id = name)
    <out>/demo.json                              the settings it was drawn with, written last

A class is a combination ``<colour> <pattern> <shape>`` ("red banded circle"). The splits hold disjoint
combinations, and every word of a val/test class also occurs in some training class, so the semantic vector
of a novel class says something its few shots may not. Shape, colour and pattern jitter within a class, over
a cluttered background.

Class vectors are the mean GloVe vector of the class's words (``dataloader.glove``), from
``assets/demo_glove.50d.txt``: the 50-d GloVe 6B lines of the 17 words, verbatim. GloVe (Pennington, Socher
and Manning, 2014; https://nlp.stanford.edu/projects/glove/) is released under the Open Data Commons Public
Domain Dedication and License (PDDL) 1.0.

Usage: ``python -m dataloader.demo --out data/demo`` (or :func:`ensure_demo_dataset` from code).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dataloader.glove import class_vectors, load_glove
from dataloader.prepare import write_split
from utils import InputError, resolve_path, save_json

# Prototype colour of each colour word as (hue in degrees, saturation, value); jitter stays near it.
COLOURS = {
    "red": (0.0, 0.85, 0.85),
    "orange": (28.0, 0.90, 0.95),
    "yellow": (56.0, 0.85, 0.95),
    "green": (125.0, 0.75, 0.70),
    "blue": (222.0, 0.80, 0.85),
    "purple": (282.0, 0.60, 0.72),
}
PATTERNS = ("plain", "banded", "checked", "spotted", "empty")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
SPLIT_SIZES = {"train": 48, "val": 16, "test": 20}
# The class lists are part of the dataset's definition, so they do not move with the image seed.
LAYOUT_SEED = 2045
# Bump when the rendering changes, so that ensure_demo_dataset() replaces data drawn by older code.
GENERATOR_VERSION = 1
IMAGE_SIZE = 84
DEFAULT_IMAGES_PER_CLASS = 60  # 5,040 images, 107 MB on disk
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down (2x2 blocks), anti-aliasing their edges
GLOVE_ASSET = Path(__file__).resolve().parent / "assets" / "demo_glove.50d.txt"
STAMP_NAME = "demo.json"


def demo_classes() -> dict[str, list[tuple[str, str, str]]]:
    """The (colour, pattern, shape) combinations of each split, sorted by name: ``{"train": [...48], ...}``.

    Each split is filled greedily from a fixed shuffle of all combinations, taking next the combination
    whose words the split has used least, so every word appears about equally often in every split.
    """
    rng = np.random.default_rng(LAYOUT_SEED)
    remaining = [(c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES]
    remaining = [remaining[i] for i in rng.permutation(len(remaining))]
    splits = {}
    for split in ("test", "val", "train"):
        counts: dict[str, int] = {}
        chosen = []
        for _ in range(SPLIT_SIZES[split]):
            # The sum of squares penalises piling up on one word more than spreading over three.
            best = min(remaining, key=lambda combo: sum(counts.get(w, 0) ** 2 for w in combo))
            remaining.remove(best)
            chosen.append(best)
            for word in best:
                counts[word] = counts.get(word, 0) + 1
        splits[split] = sorted(chosen, key=" ".join)
    return {split: splits[split] for split in ("train", "val", "test")}


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """``n`` draws shaped (n, 1, 1) so they broadcast over (n, H, W) canvases."""
    return rng.uniform(low, high, n).astype(np.float32)[:, None, None]


def _hsv_colours(hsv: np.ndarray) -> np.ndarray:
    """(n, 3) rows of (hue in [0, 1), saturation, value) -> (n, 3, 1, 1) RGB in [0, 1]."""
    rgb = np.array([colorsys.hsv_to_rgb(*row) for row in np.clip(hsv, 0.0, 1.0)], dtype=np.float32)
    return rgb[:, :, None, None]


def _random_colours(rng: np.random.Generator, n: int, sat: tuple, val: tuple) -> np.ndarray:
    """``n`` colours of any hue -> (n, 3, 1, 1)."""
    hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(*sat, n), rng.uniform(*val, n)], axis=1)
    return _hsv_colours(hsv)


def _blend(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint ``colour`` (n, 3, 1, 1) over ``canvas`` (n, 3, H, W) in place; ``alpha`` is (n, H, W)."""
    canvas += alpha[:, None] * (colour - canvas)
    return canvas


def _draw_lines(rng, canvas, x, y, count: int, alpha: tuple) -> np.ndarray:
    """``count`` random straight strokes of random colour, width and length over each canvas."""
    n = canvas.shape[0]
    for _ in range(count):
        x0, y0 = _uniform(rng, -10, IMAGE_SIZE + 10, n), _uniform(rng, -10, IMAGE_SIZE + 10, n)
        angle, length = _uniform(rng, 0, np.pi, n), _uniform(rng, 15, 90, n)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
        distance = np.hypot(x - x0 - t * dx, y - y0 - t * dy)  # of each pixel from the stroke's segment
        # A soft one-pixel edge keeps thin strokes from aliasing.
        ink = np.clip(_uniform(rng, 0.4, 1.4, n) + 0.5 - distance, 0.0, 1.0)  # half-width + 0.5 - distance
        colour = _random_colours(rng, n, (0.2, 0.9), (0.2, 0.95))
        canvas = _blend(canvas, colour, ink * _uniform(rng, *alpha, n))
    return canvas


def _background(rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Clutter: a tinted grey with a gradient and soft waves, faint blobs and strokes -> (n, 3, H, W)."""
    grey = rng.uniform(0.45, 0.7, (n, 1, 1, 1)).astype(np.float32)
    canvas = grey + rng.normal(0.0, 0.03, (n, 3, 1, 1)).astype(np.float32)
    gx, gy = _uniform(rng, -0.15, 0.15, n), _uniform(rng, -0.15, 0.15, n)
    canvas = canvas + ((gx * (x - 42) + gy * (y - 42)) / IMAGE_SIZE)[:, None]
    freq, phase = _uniform(rng, 0.03, 0.12, n), _uniform(rng, 0, 2 * np.pi, n)
    direction = _uniform(rng, 0, np.pi, n)
    waves = np.sin(freq * (x * np.cos(direction) + y * np.sin(direction)) + phase)
    canvas = canvas + (_uniform(rng, 0.0, 0.06, n) * waves)[:, None]
    for _ in range(3):
        cx, cy = _uniform(rng, 0, IMAGE_SIZE, n), _uniform(rng, 0, IMAGE_SIZE, n)
        sigma = _uniform(rng, 4, 14, n)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)) * _uniform(rng, 0.1, 0.45, n)
        canvas = _blend(canvas, _random_colours(rng, n, (0.3, 1.0), (0.3, 1.0)), blob)
    return _draw_lines(rng, canvas, x, y, count=int(rng.integers(2, 6)), alpha=(0.2, 0.6))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape in its own frame (centred, about [-1, 1]^2, ``v`` pointing up) -> bool."""
    if shape == "circle":
        return u * u + v * v <= 0.92**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        v = v + 0.27  # puts the triangle's centroid 0.27 below the origin, centring its bounding box
        normals = np.deg2rad([270.0, 30.0, 150.0])
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.55 for a in normals], axis=0)
    if shape == "star":
        outer, inner, sector = 1.05, 0.45, 2 * np.pi / 5
        # Fold every pixel into the half-sector between a tip (angle 0) and the next inner corner.
        angle = np.mod(np.arctan2(u, v), sector)
        angle = np.minimum(angle, sector - angle)
        radius = np.hypot(u, v)
        px, py = radius * np.cos(angle), radius * np.sin(angle)
        ex, ey = inner * np.cos(sector / 2) - outer, inner * np.sin(sector / 2)
        return ex * py - ey * (px - outer) >= 0  # on the origin's side of the tip-to-corner edge
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if shape == "heart":
        hx, hy = 1.2 * u, 1.2 * v + 0.15
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_ink(pattern: str, rng: np.random.Generator, n: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the second ink of ``pattern`` goes on ``n`` images (own period, phase, orientation each).

    ``x`` (1, 1, W) and ``y`` (1, H, 1) are the pixel centres; returns float (n, H, W) in {0, 1}.
    """
    if pattern in ("plain", "empty"):
        return np.zeros(np.broadcast_shapes(x.shape, (n, 1, 1)), dtype=np.float32)
    angle, period = _uniform(rng, 0, np.pi, n), _uniform(rng, 6.0, 11.0, n)
    a = (x * np.cos(angle) + y * np.sin(angle)) / period + _uniform(rng, 0, 1, n)
    b = (y * np.cos(angle) - x * np.sin(angle)) / period + _uniform(rng, 0, 1, n)
    if pattern == "banded":
        ink = np.mod(a, 1.0) < _uniform(rng, 0.35, 0.55, n)
    elif pattern == "checked":
        ink = (np.mod(a, 1.0) < 0.5) ^ (np.mod(b, 1.0) < 0.5)
    elif pattern == "spotted":
        ink = np.hypot(np.mod(a, 1.0) - 0.5, np.mod(b, 1.0) - 0.5) < _uniform(rng, 0.22, 0.32, n)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return ink.astype(np.float32)


def render_class(colour: str, pattern: str, shape: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` images of one class at once -> uint8 (count, 84, 84, 3) RGB.

    The shape is drawn at ``SUPERSAMPLE`` times the resolution and box-filtered down, which anti-aliases its
    edges; the soft background is drawn at the final resolution.
    """
    axis = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    canvas = _background(rng, count, axis[None, None, :], axis[None, :, None])

    fine = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE  # in 84-pixel units
    x, y = fine[None, None, :], fine[None, :, None]
    radius = _uniform(rng, 21.0, 32.0, count)
    # The centre moves up to 10 pixels, less when the shape would otherwise leave the image.
    shift = np.minimum(10.0, IMAGE_SIZE / 2 - 0.85 * radius - 1.0)
    cx = IMAGE_SIZE / 2 + _uniform(rng, -1, 1, count) * shift
    cy = IMAGE_SIZE / 2 + _uniform(rng, -1, 1, count) * shift
    turn, stretch = _uniform(rng, -np.pi / 6, np.pi / 6, count), _uniform(rng, 0.85, 1.15, count)
    u = ((x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)) / (radius * stretch)
    v = ((x - cx) * np.sin(turn) - (y - cy) * np.cos(turn)) / (radius / stretch)
    body = _shape_mask(shape, u, v)
    if pattern == "empty":
        shrink = 1.0 - _uniform(rng, 3.0, 5.5, count) / radius  # a 3-5.5 pixel outline
        body = body & ~_shape_mask(shape, u / shrink, v / shrink)

    hue, sat, val = COLOURS[colour]
    hsv = np.stack([np.mod(hue + rng.uniform(-9, 9, count), 360.0) / 360.0,
                    sat * rng.uniform(0.8, 1.15, count), val * rng.uniform(0.8, 1.1, count)], axis=1)
    fill = _hsv_colours(hsv)
    # The pattern's second ink is a dark or a pale version of the colour, so the hue stays readable.
    dark = rng.uniform(0, 1, count)[:, None, None, None] < 0.5
    second = np.where(dark, fill * _uniform(rng, 0.2, 0.4, count)[:, None],
                      fill + (1.0 - fill) * _uniform(rng, 0.55, 0.75, count)[:, None])
    tilt_u, tilt_v = _uniform(rng, -0.15, 0.15, count), _uniform(rng, -0.15, 0.15, count)
    coverage = body.astype(np.float32) * (1.0 + tilt_u * u + tilt_v * v)  # shading rides on the coverage
    ink = _pattern_ink(pattern, rng, count, x, y) * coverage

    def downsample(image: np.ndarray) -> np.ndarray:
        """(n, 168, 168) -> (n, 84, 84): mean of each 2x2 block (SUPERSAMPLE is 2)."""
        return 0.25 * (image[:, 0::2, 0::2] + image[:, 1::2, 0::2]
                       + image[:, 0::2, 1::2] + image[:, 1::2, 1::2])

    # Colouring is linear in coverage and ink, so it is done after the downsampling, at a quarter the cost.
    alpha, coverage, ink = downsample(body.astype(np.float32)), downsample(coverage), downsample(ink)
    canvas = canvas * (1.0 - alpha[:, None]) + fill * (coverage - ink)[:, None] + second * ink[:, None]
    canvas = _draw_lines(rng, canvas, axis[None, None, :], axis[None, :, None], count=1, alpha=(0.0, 0.35))

    contrast, brightness = _uniform(rng, 0.85, 1.15, count), _uniform(rng, -0.06, 0.06, count)
    canvas = (canvas - 0.5) * contrast[:, None] + 0.5 + brightness[:, None]
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * _uniform(rng, 0.01, 0.04, count)[:, None]
    image = np.round(np.clip(canvas + noise, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image.transpose(0, 2, 3, 1).copy()  # channels last, as the dataset files hold them


def _is_complete(out_dir: Path, stamp: dict) -> bool:
    """All files present, and the stamp (written last) records the same settings."""
    names = [f"{kind}-{split}{ext}" for split in ("train", "val", "test")
             for kind, ext in (("few-shot", ".npz"), ("few-shot-wordemb", ".npz"), ("classes", ".txt"))]
    if not all((out_dir / name).is_file() for name in names):
        return False
    try:
        return json.loads((out_dir / STAMP_NAME).read_text()) == stamp
    except (OSError, ValueError):
        return False


def make_demo_dataset(out_dir: str | os.PathLike, seed: int = 0,
                      images_per_class: int = DEFAULT_IMAGES_PER_CLASS, force: bool = False) -> Path:
    """Draw the demo dataset into ``out_dir`` (relative to the repository) unless a complete one with the same
    settings is there, or ``force``; returns the absolute folder. ``seed`` seeds every image, not the classes."""
    if images_per_class < 1:
        raise InputError(f"--images-per-class {images_per_class}: must be at least 1.")
    out_dir = resolve_path(out_dir)
    stamp = {"generator_version": GENERATOR_VERSION, "seed": seed, "images_per_class": images_per_class}
    if not force and _is_complete(out_dir, stamp):
        return out_dir
    (out_dir / STAMP_NAME).unlink(missing_ok=True)  # a run cut short must not look complete

    words = set(COLOURS) | set(PATTERNS) | set(SHAPES)
    glove = load_glove(GLOVE_ASSET, vocabulary=words)
    absent = sorted(words - set(glove.vectors))
    if absent:
        raise InputError(f"{GLOVE_ASSET}: no vector for {absent}; restore the file from the repository.")
    # NumPy releases the GIL inside its array loops, so threads drawing different classes run in parallel.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for split_index, (split, combos) in enumerate(demo_classes().items()):
            # One stream per class, so a class's images depend neither on the other classes nor on the
            # order in which the threads finish.
            drawn = [pool.submit(render_class, *combo, images_per_class,
                                 np.random.default_rng([seed, split_index, 0, label]))
                     for label, combo in enumerate(combos)]
            images = np.concatenate([future.result() for future in drawn])
            targets = np.repeat(np.arange(len(combos), dtype=np.int64), images_per_class)
            # Shuffled with a fixed seed, as the benchmark preparation shuffles its samples.
            order = np.random.default_rng([seed, split_index, 1]).permutation(len(targets))
            vectors = class_vectors([list(combo) for combo in combos], glove, fallback="zeros")
            write_split(out_dir, split, images[order], targets[order], vectors.astype(np.float32),
                        [" ".join(combo) for combo in combos])
    save_json(out_dir / STAMP_NAME, stamp)
    return out_dir


def ensure_demo_dataset(data_root: str | os.PathLike = "data", seed: int = 0,
                        images_per_class: int = DEFAULT_IMAGES_PER_CLASS) -> Path:
    """The absolute ``<data_root>/demo``, drawn first if it is absent, incomplete or drawn with other settings."""
    return make_demo_dataset(resolve_path(data_root) / "demo", seed=seed, images_per_class=images_per_class)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the embedded demo dataset (coloured patterned shapes).")
    parser.add_argument("--out", default="data/demo", help="output folder, relative to the repository root")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image (the classes are fixed)")
    parser.add_argument("--images-per-class", type=int, default=DEFAULT_IMAGES_PER_CLASS,
                        help="images drawn per class, in every split")
    parser.add_argument("--force", action="store_true", help="redraw even if a complete dataset is there")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out_dir = make_demo_dataset(args.out, args.seed, args.images_per_class, args.force)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"demo dataset ready in {out_dir} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
