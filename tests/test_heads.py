"""The TasNet heads against hand computations on tiny tensors, with and without a batch dimension."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.heads import (HeadConfig, TasNet, class_prototypes, concat_logits, fusion_logits, refine_prototypes,
                          semantic_regressor, similarity_logits)

# way 2, D 2: visual prototypes, class vectors, and 3 queries (visual part and semantic part)
VISUAL_PROTOS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
SEMANTIC_PROTOS = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
VISUAL_QUERY = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
SEMANTIC_QUERY = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def test_class_prototypes_read_shot_major_order():
    # 2 shots of 3 classes, shot-major: rows s0c0 s0c1 s0c2 s1c0 s1c1 s1c2; embedding = (class, shot)
    support = torch.tensor([[0.0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])
    assert torch.equal(class_prototypes(support, way=3, shot=2), torch.tensor([[0.0, 0.5], [1, 0.5], [2, 0.5]]))


def test_fusion_logits_by_hand():
    lam = 0.25
    config = HeadConfig(head="fusion", metric="euclidean", lamda=lam)
    logits = fusion_logits(VISUAL_PROTOS, SEMANTIC_PROTOS, VISUAL_QUERY, SEMANTIC_QUERY, config)
    # fused prototypes: 0.25*v + 0.75*s
    protos = [(0.25, 0.75), (0.75, 1.25)]
    queries = [(0.25, 1.0), (0.75, 0.5), (1.25, 0.75)]
    expected = [[-((q0 - p0) ** 2 + (q1 - p1) ** 2) for p0, p1 in protos] for q0, q1 in queries]
    torch.testing.assert_close(logits, torch.tensor(expected))
    cosine = fusion_logits(VISUAL_PROTOS, SEMANTIC_PROTOS, VISUAL_QUERY, SEMANTIC_QUERY,
                           HeadConfig(head="fusion", metric="cosine", lamda=lam))
    expected_cos = [[(q0 * p0 + q1 * p1) / ((q0 ** 2 + q1 ** 2) ** 0.5 * (p0 ** 2 + p1 ** 2) ** 0.5)
                     for p0, p1 in protos] for q0, q1 in queries]
    torch.testing.assert_close(cosine, torch.tensor(expected_cos))


def test_concat_logits_by_hand():
    logits = concat_logits(VISUAL_PROTOS, SEMANTIC_PROTOS, VISUAL_QUERY, SEMANTIC_QUERY,
                           HeadConfig(head="concat", metric="euclidean"))
    def unit(*values):
        norm = sum(v * v for v in values) ** 0.5
        return [v / norm for v in values]
    protos = [unit(1, 0, 0, 1), unit(0, 2, 1, 1)]
    queries = [unit(1, 1, 0, 1), unit(0, 2, 1, 0), unit(2, 0, 1, 1)]
    expected = [[-sum((a - b) ** 2 for a, b in zip(q, p)) for p in protos] for q in queries]
    torch.testing.assert_close(logits, torch.tensor(expected))
    cosine = concat_logits(VISUAL_PROTOS, SEMANTIC_PROTOS, VISUAL_QUERY, SEMANTIC_QUERY,
                           HeadConfig(head="concat", metric="cosine"))
    # unit vectors: squared distance = 2 - 2 cos
    torch.testing.assert_close(cosine, 1 + torch.tensor(expected) / 2)


@pytest.mark.parametrize("head", ["fusion", "concat"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_batched_heads_equal_single_episodes(head, metric):
    g = torch.Generator().manual_seed(0)
    model = TasNet(12, 4, HeadConfig(head=head, metric=metric, lamda=0.3))
    way, shot, queries = 3, 2, 5
    support, query = torch.randn(6, way * shot, 12, generator=g), torch.randn(6, way * queries, 12, generator=g)
    semantic_protos, semantic_query = torch.randn(6, way, 4, generator=g), torch.randn(6, way * queries, 4, generator=g)
    batched = model(support, query, semantic_protos, semantic_query, shot)
    assert batched.shape == (6, way * queries, way) and torch.isfinite(batched).all()
    for b in range(6):
        single = model(support[b], query[b], semantic_protos[b], semantic_query[b], shot)
        torch.testing.assert_close(batched[b], single)


def test_refine_prototypes_by_hand():
    # queries around (10, 0) and (0, 10): k-means centres are the two cluster means
    query = torch.tensor([[[9.0, 0], [11, 0], [10, 1], [10, -1], [0, 9], [0, 11], [1, 10], [-1, 10]]])
    protos = torch.tensor([[[1.0, 7.0], [6.0, 0.0]]])         # nearest centres: (0,10) and (10,0)
    refined = refine_prototypes(protos, query, HeadConfig())
    expected = F.normalize(torch.tensor([[[0.5, 8.5], [8.0, 0.0]]]), dim=-1)
    torch.testing.assert_close(refined, expected)
    assert refine_prototypes(protos[0], query[0], HeadConfig()).shape == (2, 2)   # no batch dimension


@pytest.mark.parametrize("head", ["fusion", "concat"])
def test_transductive_refines_the_visual_part_only(head):
    config = HeadConfig(head=head, metric="euclidean", lamda=0.5)
    model = TasNet(2, 2, config)
    with torch.no_grad():                                   # feat_learner = identity: visual part = input
        model.feat_learner.weight.copy_(torch.eye(2))
        model.feat_learner.bias.zero_()
    visual_query = torch.tensor([[9.0, 0], [11, 0], [0, 9], [0, 11]])
    semantic_query = torch.zeros(4, 2)
    with torch.no_grad():
        logits = model(VISUAL_PROTOS, visual_query, SEMANTIC_PROTOS, semantic_query, shot=1, transductive=True)
    refined_visual = F.normalize(torch.tensor([[5.5, 0.0], [0.0, 6.0]]), dim=-1)   # (centre + proto) / 2
    combine = fusion_logits if head == "fusion" else concat_logits
    torch.testing.assert_close(logits, combine(refined_visual, SEMANTIC_PROTOS, visual_query, semantic_query, config))


def test_regressor_is_kaiming_initialised_and_bad_metric_or_head_is_refused():
    """Also: TasNet's state dict is its two linear layers, nothing else."""
    regressor = semantic_regressor(640, 50)
    assert regressor.weight.shape == (50, 640) and torch.all(regressor.bias == 0)
    # kaiming normal (fan_in 640, gain sqrt 2): std sqrt(2/640)
    assert regressor.weight.std().item() == pytest.approx((2 / 640) ** 0.5, rel=0.05)
    with pytest.raises(ValueError):
        similarity_logits(VISUAL_QUERY, VISUAL_PROTOS, "manhattan")
    with pytest.raises(ValueError):
        HeadConfig(head="sum")
    model = TasNet(640, 50, HeadConfig())
    assert sorted(model.state_dict()) == ["feat_learner.bias", "feat_learner.weight", "word_learner.bias",
                                          "word_learner.weight"]


@pytest.mark.parametrize("head,metric", [("fusion", "euclidean"), ("concat", "cosine")])
def test_the_fast_path_computes_the_plain_reference_episode(head, metric):
    """models.reference.plain_episode (autograd, a fresh torch.optim.Adam, one episode) against the trainer's path
    (the closed-form fused inner loop, then TasNet) on the same episode, in float64: logits and fitted regressor."""
    from models.inner_loop import InnerLoopConfig, fit_semantic_regressor
    from models.reference import plain_episode

    torch.manual_seed(0)
    way, shot, query, features, dim = 3, 2, 4, 10, 6
    config, inner = HeadConfig(head=head, metric=metric, lamda=0.3), InnerLoopConfig(steps=15)
    model = TasNet(features, dim, config).double()
    plain = TasNet(features, dim, config).double()
    plain.load_state_dict(model.state_dict())
    support = torch.randn(way * shot, features, dtype=torch.float64)
    queries = torch.randn(way * query, features, dtype=torch.float64)
    class_vectors = torch.randn(way, dim, dtype=torch.float64)
    expected = plain_episode(plain.feat_learner, plain.word_learner, support, queries, class_vectors, shot, config,
                             inner)
    semantic = fit_semantic_regressor(model.word_learner, support[None], class_vectors.repeat(shot, 1)[None],
                                      queries[None], inner, "carry")[0]
    torch.testing.assert_close(model(support, queries, class_vectors, semantic, shot), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.word_learner.weight, plain.word_learner.weight, rtol=1e-9, atol=1e-9)
