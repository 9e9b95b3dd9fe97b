"""One TasNet episode, written plainly, the way the release computes it: the reference that the fast path
(:func:`models.inner_loop.fit_semantic_regressor` and :class:`models.heads.TasNet`, batched in
``trainer/meta.py``) is held to by the tests and ``bench/meta.py``.

1. Fit the semantic regressor ``word_learner`` (F -> D) on the support set: a fresh Adam and StepLR,
   ``inner.steps`` steps on mean(1 - cos(word_learner(support), class vector of each support sample)).
2. Regress the queries' semantic vectors with it (no gradient flows back).
3. Project support and queries with ``feat_learner`` (F -> D); a class's visual prototype is the mean of its
   projected support.
4. Combine: fusion ``lam * visual + (1 - lam) * semantic``, or the L2-normalised concatenation
   ``[visual, semantic]``, for prototypes (the class vectors as their semantic part) and queries alike.
5. Logits: negative squared Euclidean distance, or cosine similarity, of each query to each prototype.

The regressor keeps its fitted weights (the release's ``carry``); pass a copy for an independent episode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import HeadConfig
from models.inner_loop import InnerLoopConfig, plain_fit_regressor


def plain_episode(feat_learner: nn.Linear, word_learner: nn.Linear, support: torch.Tensor, query: torch.Tensor,
                  semantic_protos: torch.Tensor, shot: int, head: HeadConfig,
                  inner: InnerLoopConfig) -> torch.Tensor:
    """Score one inductive episode.

    Args:
        feat_learner, word_learner: Linear(F, D) each; ``word_learner`` is fitted in place.
        support: (way*shot, F) in shot-major order (labels 0..way-1 repeated ``shot`` times); query: (Q, F).
        semantic_protos: (way, D) the class vectors of the episode's classes, in label order.

    Returns:
        (Q, way) logits; they carry a gradient to ``feat_learner`` when grad is enabled.
    """
    way = semantic_protos.shape[0]
    support_targets = semantic_protos[torch.arange(way, device=support.device).repeat(shot)]
    plain_fit_regressor(word_learner, support, support_targets, inner)                       # 1
    with torch.no_grad():
        semantic_query = word_learner(query)                                                   # 2
    visual_protos = feat_learner(support).view(shot, way, -1).mean(0)                          # 3
    visual_query = feat_learner(query)
    if head.head == "fusion":                                                                  # 4
        prototypes = head.lamda * visual_protos + (1 - head.lamda) * semantic_protos
        queries = head.lamda * visual_query + (1 - head.lamda) * semantic_query
    else:
        prototypes = F.normalize(torch.cat([visual_protos, semantic_protos], 1), dim=1)
        queries = F.normalize(torch.cat([visual_query, semantic_query], 1), dim=1)
    if head.metric == "euclidean":                                                             # 5
        return -((queries.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(2)
    return F.normalize(queries, dim=1) @ F.normalize(prototypes, dim=1).t()
