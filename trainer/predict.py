"""Predictions on new images::

    python -m trainer.predict --support DIR --query DIR --init_weights BACKBONE [--eval_weights META] \\
        --glove FILE --out OUT

``--support`` holds one sub-folder per class with a few images each (1 to 5, the shots the meta stage trains
for), named as for ``python -m dataloader.prepare folder``: the folder name with ``_`` and ``-`` read as spaces,
or ``DIR/classes.txt``. ``--query`` holds the images to classify. Every image is centre-cropped and resized to
84x84 as the prepared datasets are, then passes through the feature extraction's eval transform.

With ``--eval_weights`` (the ``max_acc.pth`` of run_fusion.py or run_concatenation.py) the queries form one
TasNet test episode with the settings the checkpoint saved: the regressor is fitted on the support features
from the checkpoint's ``word_learner`` (as ``--inner_state reset``: nothing carries over), the class vectors are
the GloVe means of the class names (as the preparation computes them), and the saved head (fusion or concat,
its metric, lambda and setting) scores the queries. Without it: ProtoNet on the backbone's features. Classes
may hold different numbers of images; a prototype is the mean of its class's support.

Writes ``OUT/predictions.csv`` (file, predicted class, then one score column per class: the head's logit, the
higher the closer) and ``OUT/predictions.png`` (the queries as the model saw them, each with its prediction).
"""
from __future__ import annotations

import argparse
import csv
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dataloader.prepare.folder import (NAMES_FILE, check_names_used, glove_class_vectors, image_files,
                                       load_folder_images, read_class_folders, read_names)
from dataloader.transforms import normalization
from models import BACKBONES
from models.heads import HEAD_FUNCTIONS, TasNet, refine_prototypes, similarity_logits
from models.inner_loop import fit_semantic_regressor
from trainer.checkpoint import load_checkpoint, load_weights
from trainer.extract import extract_features, load_backbone
from trainer.meta_config import MetaConfig
from utils import InputError, atomic_write, resolve_device, resolve_path
from utils.cli import add_device_flags, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--support", required=True, help="one sub-folder of images per class (1 to 5 each), named as for "
                                         "'python -m dataloader.prepare folder' (folder name or classes.txt)")
    add("--query", required=True, help="folder of the images to classify")
    add("--init_weights", required=True, help="backbone checkpoint (the max_acc.pth of run_pre.py)")
    add("--eval_weights", default=None, help="TasNet meta checkpoint (the max_acc.pth of run_fusion.py or "
                                             "run_concatenation.py); without it, ProtoNet on the backbone's features")
    add("--glove", default=None, help="GloVe text file of the meta checkpoint's class vectors (with --eval_weights)")
    add("--model_type", default=None, choices=sorted(BACKBONES),
        help="backbone architecture (default: the one the backbone checkpoint records, else res12)")
    add("--out", required=True, help="folder for predictions.csv and predictions.png")
    add_device_flags(parser)
    return parser


def load_meta(path: Path, feature_dim: int, semantic_dim: int, glove: Path,
              device: torch.device) -> tuple[TasNet, MetaConfig]:
    """The meta model of ``path`` and the config (head, inner loop, flags) its training saved."""
    ckpt = load_checkpoint(path, device)
    config = ckpt.get("config")
    if ckpt.get("kind") != "meta" or not isinstance(config, dict):
        raise InputError(f"--eval_weights {path}: not a meta checkpoint saved by run_fusion.py or "
                         f"run_concatenation.py (it records no head settings); pass the max_acc.pth of one of "
                         f"their runs, or leave --eval_weights out for ProtoNet.")
    if ckpt.get("semantic_dim") != semantic_dim:
        raise InputError(f"--eval_weights {path} maps to D = {ckpt.get('semantic_dim')}, but --glove {glove} has "
                         f"D = {semantic_dim}: pass the GloVe file the model was trained with.")
    if ckpt.get("feature_dim") != feature_dim:
        raise InputError(f"--eval_weights {path} takes {ckpt.get('feature_dim')}-d features, but the backbone "
                         f"gives {feature_dim}-d: pass the backbone (--init_weights) it was trained on.")
    missing = [field.name for field in fields(MetaConfig) if field.name not in config]
    if missing:
        raise InputError(f"--eval_weights {path}: its saved config lacks {', '.join(missing)}; it was saved by "
                         f"another version of this code.")
    meta_config = MetaConfig(**{field.name: config[field.name] for field in fields(MetaConfig)})
    model = TasNet(feature_dim, semantic_dim, meta_config.head_config).to(device)
    load_weights(model, path, device, kind="meta")
    return model.eval(), meta_config


def class_means(embeds: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(S, D) embeddings of classes of any size, labels (S,) in 0..classes-1 -> (classes, D) prototypes."""
    sums = torch.zeros(classes, embeds.shape[1], dtype=embeds.dtype, device=embeds.device).index_add_(0, labels, embeds)
    return sums / torch.bincount(labels, minlength=classes).unsqueeze(1)


def tasnet_scores(model: TasNet, config: MetaConfig, support: torch.Tensor, labels: torch.Tensor,
                  query: torch.Tensor, class_vectors: torch.Tensor) -> torch.Tensor:
    """TasNet's test episode as the meta stage scores it, for classes of any size.

    Args:
        support: (S, F) features, labels (S,) in 0..C-1; query: (Q, F); class_vectors: (C, D).
    Returns:
        (Q, C) logits.
    """
    if config.normalize(training=False):
        support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    semantic_query = fit_semantic_regressor(model.word_learner, support[None], class_vectors[labels][None],
                                            query[None], config.inner, "reset")[0]
    visual_protos = class_means(model.feat_learner(support), labels, len(class_vectors))
    visual_query = model.feat_learner(query)
    if config.setting == "tran":
        visual_protos = refine_prototypes(visual_protos, visual_query, model.config)
    return HEAD_FUNCTIONS[model.config.head](visual_protos, class_vectors, visual_query, semantic_query, model.config)


def write_csv(path: Path, files: Sequence[Path], names: Sequence[str], scores: np.ndarray) -> None:
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "predicted", *names])
        for file, row in zip(files, scores):
            writer.writerow([file.name, names[row.argmax()], *(f"{value:.7g}" for value in row)])


def contact_sheet(path: Path, images: np.ndarray, titles: Sequence[str], columns: int = 10) -> None:
    """A grid of the (N, 84, 84, 3) images, each titled; drawn as one image with text above each tile (a
    subplot per query took seconds for a hundred)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    size, gap, title_height = images.shape[1], 6, 16
    rows, columns = -(-len(images) // columns), min(columns, len(images))
    cell_w, cell_h = size + gap, size + title_height
    sheet = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    fig = plt.figure(figsize=(1.5 * sheet.shape[1] / 100, 1.5 * sheet.shape[0] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    for index, (image, title) in enumerate(zip(images, titles)):
        top, left = (index // columns) * cell_h + title_height, (index % columns) * cell_w + gap // 2
        sheet[top:top + size, left:left + size] = image
        ax.text(left + size / 2, top - 3, title if len(title) <= 18 else title[:17] + "…", ha="center",
                va="bottom", fontsize=7)
    ax.imshow(sheet)
    ax.axis("off")
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def predict(args: argparse.Namespace) -> None:
    """Classify the query images; writes predictions.csv and predictions.png into ``--out``."""
    started = time.perf_counter()
    device = resolve_device(args.device, args.threads)
    support_dir, query_dir, out = (resolve_path(p) for p in (args.support, args.query, args.out))
    if args.eval_weights is not None and args.glove is None:
        raise InputError("--eval_weights needs --glove: the GloVe file the meta checkpoint's class vectors came from.")
    names = read_names(support_dir / NAMES_FILE)
    classes = read_class_folders(support_dir, names, 2, "classifying needs at least 2 classes")
    check_names_used(support_dir / NAMES_FILE, names, classes)
    if not query_dir.is_dir():
        raise InputError(f"--query {query_dir}: folder not found.")
    query_files = image_files(query_dir)[0]
    if not query_files:
        raise InputError(f"--query {query_dir}: no image files (such as .jpg or .png) in the folder.")
    support_images = load_folder_images([path for c in classes for path in c.images], "support")
    query_images = load_folder_images(query_files, "query")

    init_weights = resolve_path(args.init_weights)
    model_type = args.model_type or load_checkpoint(init_weights).get("model_type", "res12")
    backbone = load_backbone(model_type, init_weights, device)
    mean, std = normalization(model_type)
    support = extract_features(backbone, support_images, mean, std, device, progress=False).to(device)
    query = extract_features(backbone, query_images, mean, std, device, progress=False).to(device)
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor([len(c.images) for c in classes]))
    labels = labels.to(device)
    with torch.no_grad():
        if args.eval_weights is None:
            prototypes = class_means(support, labels, len(classes))
            scores, method = similarity_logits(query, prototypes, "euclidean"), "ProtoNet"
        else:
            glove = resolve_path(args.glove)
            vectors = glove_class_vectors(classes, glove, [c.folder for c in classes])
            model, config = load_meta(resolve_path(args.eval_weights), support.shape[1], vectors.shape[1], glove,
                                      device)
            scores = tasnet_scores(model, config, support, labels, query, torch.from_numpy(vectors).to(device))
            method = f"TasNet {config.head} ({config.setting})"
    scores = scores.cpu().numpy()
    class_names = [c.name for c in classes]
    write_csv(out / "predictions.csv", query_files, class_names, scores)
    contact_sheet(out / "predictions.png", query_images, [class_names[i] for i in scores.argmax(1)])
    print(f"{method}: {len(query_files)} queries, {len(classes)} classes -> {out}/predictions.csv and "
          f"predictions.png ({time.perf_counter() - started:.1f} s)")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; bad input exits with code 2 and one ``error:`` line (:func:`utils.cli.run_cli`)."""
    run_cli(predict, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
