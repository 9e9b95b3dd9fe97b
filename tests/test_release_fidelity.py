"""The meta stage computes what the original release computes.

1. The release's own outputs on fixed episodes (``meta_episodes.npz`` in the reference folder): the semantic
   queries after the 100-step inner loop and the logits of both heads, inductive and transductive, 1 and 5
   shots, reproduced through the public pieces (``TasNet``, ``HeadConfig``, ``semantic_queries``,
   ``InnerLoopConfig``).
2. The dataset-dependent branches the release hides in its models (cosine on CUB; concat's cosine on tiered
   and its inner StepLR(50, 0.5) on tiered and CUB), which the reference file does not cover, against the
   release's behaviour as docs/release.md describes it.
3. Transductive training episodes: k-means runs, and no gradient reaches ``feat_learner`` through the refined
   prototypes (the release computes them in NumPy).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.heads as heads
from models.heads import HeadConfig, TasNet, class_prototypes, refine_prototypes
from models.inner_loop import InnerLoopConfig, plain_fit_regressor, semantic_queries
from trainer.meta_config import MetaConfig, build_parser

CASES = [f"mini_{head}_{setting}_{shot}shot" for shot in (1, 5) for head in ("fusion", "concat")
         for setting in ("in", "tran")]


@pytest.fixture(scope="module")
def reference(reference_dir):
    return np.load(reference_dir / "meta_episodes.npz")


def release_model(head: str, seed: int, dim: int = 300) -> TasNet:
    """The regressor and projection the reference drew before its episode (its README gives the recipe)."""
    model = TasNet(640, dim, HeadConfig(head=head, metric="euclidean", lamda=0.05))
    with torch.no_grad():
        model.word_learner.weight.copy_(torch.randn(dim, 640, generator=torch.Generator().manual_seed(seed))
                                        * math.sqrt(2 / 640))
        model.word_learner.bias.zero_()
        bound = 1 / math.sqrt(640)
        model.feat_learner.weight.copy_((torch.rand(dim, 640, generator=torch.Generator().manual_seed(seed + 1))
                                         * 2 - 1) * bound)
        model.feat_learner.bias.copy_((torch.rand(dim, generator=torch.Generator().manual_seed(seed + 2))
                                       * 2 - 1) * bound)
    return model


def relative_error(ours: torch.Tensor, theirs: np.ndarray) -> float:
    theirs = torch.from_numpy(theirs)
    return float((ours - theirs).norm() / theirs.norm())


@pytest.mark.parametrize("case", CASES)
def test_release_outputs_are_reproduced(reference, case):
    _, head, setting, shots = case.split("_")
    shot = int(shots[0])
    assert case in list(reference["cases"])
    episode = f"mini_{shot}shot"
    support, query, class_vectors = (torch.from_numpy(reference[f"{episode}/{name}"])
                                     for name in ("support", "query", "class_vectors"))
    model = release_model(head, int(reference[f"{case}/weights_seed"]))
    # mini: the inner loop's default StepLR(10, 0.2); carry and reset fit one episode identically
    semantic_query = semantic_queries(model.word_learner, support[None], class_vectors.repeat(shot, 1)[None],
                                      query[None], InnerLoopConfig(), "carry")[0]
    with torch.no_grad():
        logits = model(support, query, class_vectors, semantic_query, shot, transductive=setting == "tran")
    assert relative_error(semantic_query, reference[f"{case}/semantic_query"]) < 1e-4
    assert relative_error(logits, reference[f"{case}/logits"]) < 1e-4


# ---------------------------------------------------------------------------------- dataset-dependent branches
def resolved(head: str, dataset: str) -> MetaConfig:
    return MetaConfig.from_args(build_parser().parse_args(["--head", head, "--dataset", dataset]), shot=1)


@pytest.mark.parametrize("head,dataset,metric,step_size,gamma", [
    ("fusion", "mini", "euclidean", 10, 0.2), ("fusion", "tiered", "euclidean", 10, 0.2),
    ("fusion", "cifar_fs", "euclidean", 10, 0.2), ("fusion", "cub", "cosine", 10, 0.2),
    ("concat", "mini", "euclidean", 10, 0.2), ("concat", "cifar_fs", "euclidean", 10, 0.2),
    ("concat", "tiered", "cosine", 50, 0.5), ("concat", "cub", "cosine", 50, 0.5),
])
def test_release_dataset_branches_pick_metric_inner_schedule_and_normalisation(head, dataset, metric, step_size, gamma):
    config = resolved(head, dataset)
    assert (config.metric, config.inner.step_size, config.inner.gamma) == (metric, step_size, gamma)
    # the release L2-normalises concat's input features in training episodes only; fusion never
    assert config.normalize(training=True) == (head == "concat") and not config.normalize(training=False)


@pytest.mark.slow
def test_concat_inner_schedule_on_tiered_and_cub_is_steplr_50_half():
    config = resolved("concat", "cub").inner
    rates = config.learning_rates()
    assert rates == [0.01] * 50 + [0.005] * 50
    # and the fast fit follows torch's own StepLR(50, 0.5) step for step (float64: exact to round-off)
    g = torch.Generator().manual_seed(3)
    support, targets = torch.randn(5, 640, generator=g, dtype=torch.float64), torch.randn(5, 312, generator=g,
                                                                                        dtype=torch.float64)
    plain = torch.nn.Linear(640, 312).double()
    fast = torch.nn.Linear(640, 312).double()
    fast.load_state_dict(plain.state_dict())
    plain_fit_regressor(plain, support, targets, config)
    query = torch.randn(1, 7, 640, generator=g, dtype=torch.float64)
    ours = semantic_queries(fast, support[None], targets[None], query, config, "carry")[0]
    torch.testing.assert_close(ours, plain(query[0]).detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("head", ["fusion", "concat"])
def test_cosine_branch_scores_cosine_similarity_of_the_combined_embeddings(head):
    g = torch.Generator().manual_seed(1)
    config = HeadConfig(head=head, metric="cosine", lamda=0.05)
    model = TasNet(16, 6, config)
    way, shot = 3, 2
    support, query = torch.randn(way * shot, 16, generator=g), torch.randn(9, 16, generator=g)
    class_vectors, semantic_query = torch.rand(way, 6, generator=g) * 100, torch.randn(9, 6, generator=g)
    with torch.no_grad():
        logits = model(support, query, class_vectors, semantic_query, shot)
        visual_protos = class_prototypes(model.feat_learner(support), way, shot)
        visual_query = model.feat_learner(query)
    if head == "fusion":
        protos = 0.05 * visual_protos + 0.95 * class_vectors
        queries = 0.05 * visual_query + 0.95 * semantic_query
    else:
        protos = F.normalize(torch.cat([visual_protos, class_vectors], 1), dim=1)
        queries = F.normalize(torch.cat([visual_query, semantic_query], 1), dim=1)
    expected = F.cosine_similarity(queries[:, None], protos[None], dim=-1)
    torch.testing.assert_close(logits, expected)


# ---------------------------------------------------------------------------------- transductive training
def transductive_episode(head: str):
    g = torch.Generator().manual_seed(5)
    way, shot, per_class = 3, 2, 6
    centres = torch.randn(way, 20, generator=g) * 6
    support = (centres.repeat(shot, 1) + 0.3 * torch.randn(way * shot, 20, generator=g))
    query = centres.repeat(per_class, 1) + 0.3 * torch.randn(way * per_class, 20, generator=g)
    model = TasNet(20, 4, HeadConfig(head=head, lamda=0.5))
    class_vectors, semantic_query = torch.randn(way, 4, generator=g), torch.randn(way * per_class, 4, generator=g)
    labels = torch.arange(way).repeat(per_class)
    return model, support, query, class_vectors, semantic_query, labels, shot


@pytest.mark.parametrize("head", ["fusion", "concat"])
def test_transductive_training_runs_kmeans_without_gradient_through_the_refined_prototypes(head, monkeypatch):
    model, support, query, class_vectors, semantic_query, labels, shot = transductive_episode(head)
    calls = []
    real_kmeans = heads.batched_kmeans
    monkeypatch.setattr(heads, "batched_kmeans", lambda *a, **k: calls.append(1) or real_kmeans(*a, **k))
    model.train()
    loss = F.cross_entropy(model(support, query, class_vectors, semantic_query, shot, transductive=True), labels)
    loss.backward()
    assert calls, "a transductive training episode must run k-means"
    grads = [p.grad.clone() for p in model.feat_learner.parameters()]

    # the same loss with the refined prototypes as constants: the gradients must be identical
    model.zero_grad()
    with torch.no_grad():
        constant = refine_prototypes(class_prototypes(model.feat_learner(support), 3, shot),
                                     model.feat_learner(query), model.config)
    combine = heads.HEAD_FUNCTIONS[head]
    logits = combine(constant, class_vectors, model.feat_learner(query), semantic_query, model.config)
    F.cross_entropy(logits, labels).backward()
    for ours, expected in zip(grads, model.feat_learner.parameters()):
        torch.testing.assert_close(ours, expected.grad)

    # a refinement that let the gradient through (what the release does not do) would have given others
    model.zero_grad()
    visual_protos = class_prototypes(model.feat_learner(support), 3, shot)
    leaky = constant + visual_protos - visual_protos.detach()           # same values, gradient of identity
    logits = combine(leaky, class_vectors, model.feat_learner(query), semantic_query, model.config)
    F.cross_entropy(logits, labels).backward()
    assert not torch.allclose(grads[0], model.feat_learner.weight.grad)


def test_training_loop_passes_the_transductive_setting(monkeypatch):
    """``train_epoch`` refines in training episodes when ``--setting tran``, and only then."""
    import trainer.meta as meta
    from dataloader.datasets import FeatureSplit

    g = torch.Generator().manual_seed(0)
    features = torch.randn(40, 640, generator=g)
    split = FeatureSplit(features=features, targets=torch.arange(5).repeat_interleave(8),
                         class_vectors=torch.randn(5, 12, generator=g), name="synthetic")
    real_refine = heads.refine_prototypes
    for setting, expected in (("in", 0), ("tran", 2)):
        calls = []
        monkeypatch.setattr(heads, "refine_prototypes", lambda *a: calls.append(1) or real_refine(*a))
        args = build_parser().parse_args(["--setting", setting, "--inner_steps", "2", "--shot", "1"])
        config = MetaConfig.from_args(args, shot=1)
        model = TasNet(640, 12, config.head_config)
        optimizer = torch.optim.Adam(model.feat_learner.parameters())
        indices = meta.EpisodeSampler(split.targets, 5, 1, 3, 2).sample(2, torch.Generator().manual_seed(0))
        meta.train_epoch(model, optimizer, split, indices, config, query=3)
        assert len(calls) == expected, setting
