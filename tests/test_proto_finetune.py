"""``run_proto.py --finetune``: the release's ProtoNet phase (episodic fine-tuning of the backbone).

Conv-4 on the tiny synthetic images (train 4 classes x 3 images, val/test 3 x 3), a few episodes per epoch: the
run folder and result, the learning-rate schedule, the per-pixel normalisation of every input, Ctrl-C + --resume
equal to a straight run, the parser's defaults, and the fast evaluation path against the plain one.
"""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import run_proto
from dataloader.datasets import load_images
from dataloader.transforms import normalization
from models import build_backbone
from trainer import proto_finetune
from trainer.checkpoint import load_checkpoint, load_weights, save_checkpoint
from trainer.evaluate import episode_indices, evaluate_protonet, evaluate_protonet_per_episode
from trainer.extract import extract_features
from trainer.runs import Run, step_lr
from utils.interrupt import StopRequest
from utils import mean_ci95

TINY = ["--finetune", "--model_type", "conv4", "--device", "cpu", "--way", "3", "--shot", "1", "--train_query", "2",
        "--val_query", "2", "--query", "2", "--episodes", "4", "--val_episodes", "3", "--num_batch", "2",
        "--max_epoch", "1", "--vlr", "0.01"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A Conv-4 backbone checkpoint standing in for a pretrained one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "conv4.pth"
    save_checkpoint(path, build_backbone("conv4").state_dict(), kind="backbone", model_type="conv4")
    return path


def tiny_argv(data_root, weights, run_dir, *extra: str) -> list[str]:
    return ["--data_root", str(data_root), "--init_weights", str(weights), "--run_dir", str(run_dir), *TINY, *extra]


def test_parser_defaults_match_the_release():
    args = run_proto.parse_args([])
    assert not args.finetune  # the feature-based baseline stays the default
    assert (args.vlr, args.step_size, args.gamma, args.max_epoch, args.num_batch) == (1e-3, 10, 0.5, 100, 100)
    assert (args.way, args.shot, args.train_query, args.val_query, args.query) == (5, [1, 5], 15, 15, 15)
    assert (args.val_episodes, args.episodes, args.amp, args.channels_last) == (100, 600, "auto", "auto")


def test_resume_without_finetune_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_proto.parse_args(["--resume", "--run_dir", "x"])
    assert exit_.value.code == 2 and "--finetune" in capsys.readouterr().err


def test_missing_init_weights_is_one_line_error(tiny_image_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_proto.main(tiny_argv(tiny_image_root, tmp_path / "none.pth", tmp_path / "run"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--init_weights" in err and "Traceback" not in err


@pytest.mark.slow
def test_finetune_writes_run_folders_and_tests_the_common_episodes(tiny_image_root, pretrained, tmp_path):
    run_dir = tmp_path / "run"
    run_proto.main(tiny_argv(tiny_image_root, pretrained, run_dir, "--shot", "1", "2", "--train_query", "1",
                             "--val_query", "1", "--query", "1", "--max_epoch", "2"))
    _, targets = load_images(tiny_image_root, "mini", "test")
    images, _ = load_images(tiny_image_root, "mini", "test")
    mean, std = normalization("conv4")
    for shot in (1, 2):
        folder = run_dir / f"shot{shot}"
        assert {p.name for p in folder.iterdir()} >= {"config.json", "log.jsonl", "curves.png", "result.json",
                                                      "max_acc.pth", "last.pth"}
        result = json.loads((folder / "result.json").read_text())
        assert result["method"] == "protonet_finetune"
        assert {k: result[k] for k in ("dataset", "model_type", "shot", "way", "test_query", "seed", "test_episodes",
                                       "device")} == {"dataset": "mini", "model_type": "conv4", "shot": shot,
                                                      "way": 3, "test_query": 1, "seed": 1, "test_episodes": 4,
                                                      "device": "cpu"}
        assert result["weights"] == str(folder / "max_acc.pth")
        records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2]
        best = max(records, key=lambda r: r["val_acc"])  # the first of equal ones is kept
        assert (result["val_best_acc"], result["val_best_epoch"]) == (best["val_acc"], best["epoch"])

        # max_acc.pth is a plain backbone checkpoint, and the test is the plain per-episode ProtoNet on the
        # episodes every other method uses for --seed 1, with pixel-normalised inputs
        backbone = build_backbone("conv4")
        ckpt = load_weights(backbone, folder / "max_acc.pth", kind="backbone")
        assert ckpt["pixel_normalized"] and ckpt["epoch"] == best["epoch"]
        net = proto_finetune.PixelNormalized(backbone)
        embed = partial(extract_features, net, mean=mean, std=std, device="cpu", progress=False)
        plain = evaluate_protonet_per_episode(embed, images, targets, way=3, shot=shot, query=1, episodes=4, seed=1)
        assert result["test_acc"] == pytest.approx(mean_ci95(plain)[0], abs=1e-12)
        assert load_checkpoint(folder / "last.pth")["epoch"] == 2
        # the backbone moved
        assert any(not torch.equal(v, w) for v, w in zip(ckpt["params"].values(),
                                                         load_checkpoint(pretrained)["params"].values()))


def test_episode_accuracies_equal_full_split_features(tiny_image_root):
    """The fast path (only the images the episodes use) == evaluate_protonet on the features of the whole split."""
    torch.manual_seed(1)
    net = proto_finetune.PixelNormalized(build_backbone("conv4")).eval()
    images, targets = load_images(tiny_image_root, "mini", "val")
    mean, std = normalization("conv4")
    kwargs = dict(way=3, shot=1, query=1, episodes=5, seed=7)
    indices = episode_indices(targets, **kwargs)
    fast = proto_finetune.episode_accuracies(net, images, indices, 3, 1, 1, mean, std, torch.device("cpu"),
                                             batch_size=4)
    features = extract_features(net, images, mean, std, "cpu", progress=False)
    assert fast == evaluate_protonet(features, targets, **kwargs)


def test_learning_rate_steps_at_each_epoch_start(tiny_image_root, pretrained, tmp_path, monkeypatch):
    """The optimizer's lr in each of 35 epochs (training and validation skipped): vlr * gamma^floor(e / step)."""
    args = run_proto.parse_args(tiny_argv(tiny_image_root, pretrained, tmp_path, "--max_epoch", "35", "--vlr",
                                          "0.001"))
    device = torch.device("cpu")
    run = proto_finetune.FinetuneRun(args, 1, proto_finetune.ImageSplits(args, device), Run(tmp_path, vars(args)),
                                     device, pretrained)
    seen = []
    monkeypatch.setattr(run, "train_epoch",
                        lambda epoch, sampler, stop: seen.append(run.optimizer.param_groups[0]["lr"]) or (0.0, 0.0))
    monkeypatch.setattr(run, "end_epoch", lambda *a: None)
    run.train(StopRequest())
    assert run.optimizer.defaults["weight_decay"] == 0
    assert seen == pytest.approx([step_lr(1e-3, 0.5, 10, e) for e in range(1, 36)], rel=1e-12)
    assert (seen[0], seen[8], seen[9], seen[19], seen[34]) == pytest.approx((1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4))


def test_every_backbone_input_is_pixel_normalised(tiny_image_root, pretrained, tmp_path, monkeypatch):
    """Training (augmented), validation and test inputs: each pixel's RGB vector has unit length."""
    seen = []

    def record(module, inputs):
        (images,) = inputs
        seen.append((module.training, images.detach().clone()))

    original_load = proto_finetune.load_backbone

    def load_with_hook(*args):
        backbone = original_load(*args)
        backbone.register_forward_pre_hook(record)
        return backbone

    monkeypatch.setattr(proto_finetune, "load_backbone", load_with_hook)
    train_augment, augmented = proto_finetune.train_augment, []
    monkeypatch.setattr(proto_finetune, "train_augment",
                        lambda *a, **k: augmented.append(train_augment(*a, **k)) or augmented[-1])
    run_proto.main(tiny_argv(tiny_image_root, pretrained, tmp_path / "run"))
    assert [training for training, _ in seen].count(True) == 2  # one forward pass per training episode
    assert any(not training for training, _ in seen)            # validation and test
    for _, images in seen:
        torch.testing.assert_close(images.norm(dim=1), torch.ones_like(images[:, 0]), rtol=0, atol=1e-5)
    # what the backbone received in training is the augmented batch, normalised per pixel
    train_inputs = [images for training, images in seen if training]
    for received, batch in zip(train_inputs, augmented, strict=True):
        torch.testing.assert_close(received, F.normalize(batch, dim=1))


def test_resume_refuses_changed_flags(tiny_image_root, pretrained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_proto.main(tiny_argv(tiny_image_root, pretrained, run_dir))
    with pytest.raises(SystemExit) as exit_:
        run_proto.main(tiny_argv(tiny_image_root, pretrained, run_dir, "--resume", "--vlr", "0.5"))
    assert exit_.value.code == 2 and "--vlr 0.01 -> 0.5" in capsys.readouterr().err
