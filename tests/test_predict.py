"""``python -m trainer.predict``: on the images of one test episode it predicts what the meta stage's evaluation
(or the ProtoNet baseline) predicts for that episode; its outputs; refusal of bad input."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloader.datasets import load_features, load_images
import run_pre
from dataloader.prepare import main as prepare
from models import build_backbone
from models.heads import HeadConfig, TasNet
from trainer.checkpoint import save_checkpoint
from trainer.evaluate import episode_indices, protonet_logits
from trainer.extract import ensure_features
from trainer.predict import main as predict
from trainer.report import report
from synthetic_data import mini_class_folders

WAY, SHOT, QUERY, SEED = 3, 2, 3, 1
MODEL_TYPE = "conv4"  # a CPU-sized backbone: what matters is that both paths see the same features
DATASET = "own"     # a folder of one's own classes, as --dataset takes it


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_dir) -> tuple[Path, Path, Path]:
    """(data root, backbone checkpoint, GloVe file): a folder tree of real JPEGs prepared with ``prepare folder``
    (3 classes x 6 images per split), and a Conv-4 pretrained on it for one epoch by run_pre.py."""
    root = tmp_path_factory.mktemp("predict")
    raw = mini_class_folders(root / "raw", classes=WAY, images=SHOT + QUERY + 1)
    glove = data_dir / "glove" / "glove.6B.50d.subset.txt"
    assert prepare(["folder", "--raw", str(raw), "--glove", str(glove), "--out", str(root / "data" / DATASET),
                    "--way", str(WAY)]) == 0
    run_pre.main(["--dataset", DATASET, "--data_root", str(root / "data"), "--model_type", MODEL_TYPE,
                  "--pre_max_epoch", "1", "--pre_batch_size", "6", "--way", str(WAY), "--shot", "1",
                  "--val_query", "2", "--val_episodes", "5", "--device", "cpu", "--run_dir", str(root / "pre")])
    backbone = root / "pre" / "max_acc.pth"
    ensure_features(root / "data", DATASET, MODEL_TYPE, backbone, "cpu")
    return root / "data", backbone, glove


def conv4_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, build_backbone(MODEL_TYPE).state_dict(), kind="backbone", model_type=MODEL_TYPE)
    return path


def meta_stage_episode(data_root: Path, backbone: Path, run_dir: Path, head: str, setting: str,
                       normalize_input: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Train a meta model with the meta stage, then score its first test episode as the meta stage's evaluation
    does. Returns the checkpoint, the episode's (way*(shot+query),) test-split indices (shot-major) and its
    (way*query, way) logits."""
    from trainer.evaluate import episode_accuracy
    from trainer.meta import evaluate, fit_regressor, gather_episodes, load_meta_model, main
    from trainer.meta_config import MetaConfig, build_parser

    flags = dict(data_root=data_root, dataset=DATASET, model_type=MODEL_TYPE, init_weights=backbone, head=head,
                 setting=setting, normalize_input=normalize_input, way=WAY, shot=SHOT, train_query=QUERY,
                 val_query=QUERY, test_query=QUERY, max_epoch=1, num_batch=3, val_episodes=2, test_episodes=2,
                 inner_steps=30, kmeans_n_init=2, seed=SEED, device="cpu", run_dir=run_dir)
    args = build_parser().parse_args([word for key, value in flags.items() for word in (f"--{key}", str(value))])
    main(args)
    config = MetaConfig.from_args(args, SHOT)
    split = load_features(data_root, DATASET, MODEL_TYPE, "test")
    indices = episode_indices(split.targets, WAY, SHOT, QUERY, 1, SEED)
    model, _ = load_meta_model(run_dir / "max_acc.pth", config, split.features.shape[1],
                               split.class_vectors.shape[1], torch.device("cpu"))
    batch = gather_episodes(split, indices, config, QUERY, training=False)
    with torch.no_grad():
        logits = model(batch.support, batch.query, batch.semantic_protos, fit_regressor(model, batch, config),
                       SHOT, transductive=setting == "tran")
        assert torch.equal(evaluate(model, split, indices, config, QUERY), episode_accuracy(logits, batch.query_labels))
    return run_dir / "max_acc.pth", indices[0], logits[0]


def write_episode(folder: Path, data_root: Path, indices: torch.Tensor) -> list[str]:
    """The episode's images as PNGs (lossless): ``support/<class folder>/`` and ``query/NN.png`` in query order.
    Returns the readable name of each episode label."""
    images, targets = load_images(data_root, DATASET, "test")
    classes = [line.split("\t") for line in (data_root / DATASET / "classes-test.txt").read_text().splitlines()]
    episode_classes = [classes[targets[i]] for i in indices[:WAY].tolist()]
    for n, index in enumerate(indices.tolist()):
        query = n - WAY * SHOT
        path = folder / "query" / f"{query:02d}.png" if query >= 0 else \
            folder / "support" / episode_classes[n % WAY][0] / f"{n:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(path)
    return [name for _, name in episode_classes]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fusion-in-never", "concat-in-train", "fusion-tran-always", "protonet"])
def test_predictions_on_a_test_episode_are_the_meta_stages(prepared, tmp_path, method, capsys, one_thread):
    data_root, backbone, glove = prepared
    if method == "protonet":
        split = load_features(data_root, DATASET, MODEL_TYPE, "test")
        indices = episode_indices(split.targets, WAY, SHOT, QUERY, 1, SEED)[0]
        features = split.features[indices]
        logits = protonet_logits(features[:WAY * SHOT], features[WAY * SHOT:], WAY)
        meta = []
    else:
        checkpoint, indices, logits = meta_stage_episode(data_root, backbone, tmp_path / "run", *method.split("-"))
        meta = ["--eval_weights", str(checkpoint)]
    names = write_episode(tmp_path, data_root, indices)
    predict(["--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"), "--init_weights",
             str(backbone), *meta, "--glove", str(glove), "--out", str(tmp_path / "out"), "--device", "cpu"])
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [f"{n:02d}.png" for n in range(WAY * QUERY)]
    assert [row["predicted"] for row in rows] == [names[j] for j in logits.argmax(1).tolist()]
    scores = torch.tensor([[float(row[name]) for name in names] for row in rows])
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-5)
    with Image.open(tmp_path / "out" / "predictions.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 2 * 84
    assert f"{WAY * QUERY} queries, {WAY} classes" in capsys.readouterr().out
    if method != "protonet":  # the meta run of one's own classes in the results table, both protocols
        rows, table = report([tmp_path / "run"], tmp_path / "report")
        assert len(rows) == 1 and f"{DATASET} |" in table and "reset" in table and "carry" in table
        assert (tmp_path / "report" / "results.csv").is_file() and (tmp_path / "report" / "results.png").is_file()


def tiny_support_and_query(root: Path) -> Path:
    """``support/{red_fox,owl}/`` with 2 random images each, ``query/`` with 3, and a 3-d GloVe file."""
    rng = np.random.default_rng(0)
    for folder, count in (("support/red_fox", 2), ("support/owl", 2), ("query", 3)):
        (root / folder).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / folder / f"{k}.png")
    (root / "glove.txt").write_text("red 1 2 3\nfox 3 2 1\nowl 0 0 1\n")
    return root


def meta_checkpoint(path: Path, semantic_dim: int) -> Path:
    """A meta checkpoint of the layout the meta stage saves, for 64-d (Conv-4) features."""
    model = TasNet(64, semantic_dim, HeadConfig())
    from trainer.meta_config import MetaConfig, build_parser

    args = build_parser().parse_args(["--inner_steps", "5", "--kmeans_max_iter", "10", "--kmeans_n_init", "1"])
    config = MetaConfig.from_args(args, shot=1).flags()
    save_checkpoint(path, model.state_dict(), kind="meta", head="fusion", semantic_dim=semantic_dim,
                    feature_dim=64, config=config)
    return path


@pytest.mark.parametrize("damage, named", [
    (lambda root: (root / "query" / "1.png").write_bytes(b"broken"), "query/1.png: unreadable image"),
    (lambda root: [p.unlink() for p in (root / "query").iterdir()], "query: no image files"),
    (lambda root: (root / "support" / "cat").mkdir(), "support/cat: class folder without images"),
    (lambda root: (root / "support" / "classes.txt").write_text("red_fox fox\nowls owl\n"),
     "classes.txt: no class folder named owls"),
    (lambda root: shutil.rmtree(root / "support" / "owl"),
     "support: 1 class folder(s); classifying needs at least 2 classes"),
    (lambda root: meta_checkpoint(root / "m.pth", 50), "m.pth maps to D = 50, but --glove|glove.txt has D = 3"),
    (lambda root: shutil.copy(root / "b.pth", root / "m.pth"), "m.pth: not a meta checkpoint"),
])
def test_bad_input_is_refused_naming_it_without_traceback(tmp_path, capsys, damage, named, one_thread):
    root = tiny_support_and_query(tmp_path)
    conv4_checkpoint(root / "b.pth")
    meta_checkpoint(root / "m.pth", 3)
    damage(root)
    with pytest.raises(SystemExit) as exit_:
        predict(["--support", str(root / "support"), "--query", str(root / "query"), "--init_weights",
                 str(root / "b.pth"), "--eval_weights", str(root / "m.pth"), "--glove", str(root / "glove.txt"),
                 "--out", str(root / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert all(part in err for part in named.split("|")) and not (root / "out").exists()


@pytest.mark.slow  # two runs of the command, with matplotlib
def test_meta_and_protonet_predictions_of_any_class_sizes(tmp_path, one_thread):
    root = tiny_support_and_query(tmp_path)
    (root / "support" / "owl" / "1.png").unlink()  # classes of 1 and 2 images
    for meta in ([], ["--eval_weights", str(meta_checkpoint(root / "m.pth", 3))]):
        predict(["--support", str(root / "support"), "--query", str(root / "query"), "--init_weights",
                 str(conv4_checkpoint(root / "b.pth")), *meta, "--glove", str(root / "glove.txt"),
                 "--out", str(root / "out"), "--device", "cpu"])
        lines = (root / "out" / "predictions.csv").read_text().splitlines()
        assert lines[0] == "file,predicted,owl,red fox" and [line.split(",")[0] for line in lines[1:]] == [
            "0.png", "1.png", "2.png"]
        assert all(line.split(",")[1] in ("owl", "red fox") for line in lines[1:])
