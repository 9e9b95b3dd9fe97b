"""ProtoNet evaluation: the logits, fixed episodes, and cached features == per-episode forwarding."""
from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

import run_proto
from dataloader.datasets import feature_path, load_images
from dataloader.transforms import normalization
from models import build_backbone
from trainer.evaluate import (episode_indices, evaluate_protonet, evaluate_protonet_per_episode,
                              protonet_logits)
from trainer.extract import extract_features
from utils import save_npz


def plain_logits(support: np.ndarray, labels: np.ndarray, query: np.ndarray, way: int) -> np.ndarray:
    """The definition, one class and one query at a time."""
    protos = [support[labels == c].mean(axis=0) for c in range(way)]
    return np.array([[-((q - p) ** 2).sum() for p in protos] for q in query])


def test_logits_match_the_definition_single_and_batched():
    gen = torch.Generator().manual_seed(0)
    way, shot, query = 4, 3, 5
    support = torch.randn(6, way * shot, 16, generator=gen, dtype=torch.float64)
    queries = torch.randn(6, way * query, 16, generator=gen, dtype=torch.float64)
    labels = torch.arange(way).repeat(shot)
    batched = protonet_logits(support, queries, way)
    assert batched.shape == (6, way * query, way)
    for b in range(6):
        expected = plain_logits(support[b].numpy(), labels.numpy(), queries[b].numpy(), way)
        np.testing.assert_allclose(batched[b].numpy(), expected, rtol=1e-12)
        torch.testing.assert_close(protonet_logits(support[b], queries[b], way), batched[b])


def clustered_features(classes: int, per_class: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 32, generator=gen) * 3
    targets = torch.arange(classes).repeat_interleave(per_class)
    features = centres[targets] + spread * torch.randn(len(targets), 32, generator=gen)
    return features, targets


def test_separable_features_score_1_and_the_seed_fixes_the_episodes():
    features, targets = clustered_features(10, 20, spread=0.1)
    accs = evaluate_protonet(features, targets, way=5, shot=1, query=15, episodes=50, seed=3)
    assert len(accs) == 50 and all(a == 1.0 for a in accs)
    # the seed fixes the episodes: same seed, same indices; another seed, others
    a = episode_indices(targets, 5, 1, 15, 50, seed=3)
    assert torch.equal(a, episode_indices(targets, 5, 1, 15, 50, seed=3))
    assert not torch.equal(a, episode_indices(targets, 5, 1, 15, 50, seed=4))
    noisy, targets = clustered_features(10, 20, spread=3.0)
    accs = evaluate_protonet(noisy, targets, way=5, shot=1, query=15, episodes=50, seed=3)
    assert 0.2 < np.mean(accs) < 1.0
    assert accs == evaluate_protonet(noisy, targets, way=5, shot=1, query=15, episodes=50, seed=3)


@pytest.mark.slow
def test_cached_features_give_the_per_episode_accuracies(tiny_image_root):
    """Validation on features computed once == the original's forwarding of each episode, same episodes."""
    torch.manual_seed(0)
    backbone = build_backbone("res12").eval()
    images, targets = load_images(tiny_image_root, "mini", "val")
    mean, std = normalization("res12")
    embed = partial(extract_features, backbone, mean=mean, std=std, device="cpu", progress=False)
    features = embed(images)
    kwargs = dict(way=3, shot=1, query=2, episodes=2, seed=5)
    cached = evaluate_protonet(features, targets, **kwargs)
    plain = evaluate_protonet_per_episode(embed, images, targets, **kwargs)
    assert cached == plain
    # and the features themselves agree, which is why: eval-mode BatchNorm makes each image independent
    first = episode_indices(targets, **kwargs)[0].numpy()
    torch.testing.assert_close(embed(images[first]), features[first], rtol=1e-4, atol=1e-4)


def test_run_proto_on_cached_features_writes_one_result_per_shot(tiny_image_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_image_root, root)
    for split in ("train", "val", "test"):
        _, targets = load_images(root, "mini", split)
        features, _ = clustered_features(int(targets.max()) + 1, 1, spread=0.0, seed=1)
        save_npz(feature_path(root, "mini", "res12", split), features=features[targets].numpy(), targets=targets)
    run_dir = tmp_path / "run"
    run_proto.main(["--data_root", str(root), "--way", "2", "--shot", "1", "2", "--query", "1", "--episodes", "20",
                    "--run_dir", str(run_dir), "--device", "cpu"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["episodes"] == 20 and set(result["shots"]) == {"1", "2"}
    assert result["shots"]["1"] == {"acc": 1.0, "ci95": 0.0}
    assert "+-" in capsys.readouterr().out


def test_run_proto_without_features_or_weights_exits_2_naming_the_checkpoint(tiny_image_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_proto.main(["--data_root", str(tiny_image_root), "--init_weights", str(tmp_path / "none.pth"),
                        "--run_dir", str(tmp_path / "run"), "--device", "cpu"])
    assert exit_.value.code == 2
    assert "none.pth: checkpoint not found" in capsys.readouterr().err
