"""The TasNet heads: semantic regressor, visual projection, fusion and concatenation, metrics, and the
transductive prototype refinement (docs/release.md, "Meta stage").

Every function takes optional leading batch dimensions, so one call scores one episode or B episodes:
support features (..., way*shot, F) in shot-major order, queries (..., Q, F), semantic prototypes
(..., way, D) (the class vectors of the episode's classes, in episode-label order), semantic queries
(..., Q, D) (the fitted regressor's outputs, see ``models.inner_loop``). F = the backbone's feature size
(640 for ResNet-12 and WRN-28-10, 64 for Conv-4), D = the class-vector size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.kmeans import batched_kmeans

HEADS = ("fusion", "concat")
METRICS = ("euclidean", "cosine")


@dataclass(frozen=True)
class HeadConfig:
    """How a head scores queries.

    head: ``fusion`` (weighted sum of visual and semantic embeddings) or ``concat`` (normalised concatenation).
    metric: ``euclidean`` (logits = negative squared distance) or ``cosine`` (logits = cosine similarity).
    lamda: weight of the visual part in fusion (the original's spelling); unused by concat.
    kmeans_*: the transductive refinement's k-means (k = way).
    """

    head: str = "fusion"
    metric: str = "euclidean"
    lamda: float = 0.05
    kmeans_max_iter: int = 1000
    kmeans_n_init: int = 10
    kmeans_seed: int = 0

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")


def visual_projection(feature_dim: int, semantic_dim: int) -> nn.Linear:
    """``feat_learner``: Linear(F, D) with PyTorch's default init, trained by the outer loop."""
    return nn.Linear(feature_dim, semantic_dim)


def semantic_regressor(feature_dim: int, semantic_dim: int) -> nn.Linear:
    """``word_learner``: Linear(F, D), kaiming-normal weight and zero bias, fitted per episode by the inner loop."""
    regressor = nn.Linear(feature_dim, semantic_dim)
    nn.init.kaiming_normal_(regressor.weight)
    nn.init.zeros_(regressor.bias)
    return regressor


def class_prototypes(support_embeds: torch.Tensor, way: int, shot: int) -> torch.Tensor:
    """Mean over shots of shot-major support embeddings: (..., way*shot, D) -> (..., way, D)."""
    return support_embeds.unflatten(-2, (shot, way)).mean(-3)


def similarity_logits(query: torch.Tensor, prototypes: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., Q, D) queries against (..., W, D) prototypes -> (..., Q, W) logits.

    ``euclidean``: negative squared distance (computed as a difference, not the |a|^2 - 2ab + |b|^2 expansion,
    whose cancellation would blur close distances); ``cosine``: cosine similarity.
    """
    if metric == "euclidean":
        return -(query.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(-1)
    if metric == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def refine_prototypes(visual_protos: torch.Tensor, visual_query: torch.Tensor, config: HeadConfig) -> torch.Tensor:
    """Transductive refinement of the visual prototypes, as the release: k-means (k = way) on the projected
    queries; each prototype becomes the L2-normalised mean of itself and its nearest cluster centre.

    The release computes this in NumPy, so the refined prototypes carry no gradient: in a transductive
    training episode only the queries (and the class vectors) reach ``feat_learner``. Both heads call it on
    the visual part alone; they differ only in how they combine the result with the semantic part.

    Args:
        visual_protos: (..., W, D) mean projected support; visual_query: (..., Q, D) projected queries
            (unnormalised; the semantic part takes no part in the clustering).

    Returns:
        (..., W, D) refined prototypes, unit norm, detached.
    """
    lead = visual_protos.shape[:-2]
    prototypes = visual_protos.detach().reshape(-1, *visual_protos.shape[-2:])         # (B, W, D)
    queries = visual_query.detach().reshape(-1, *visual_query.shape[-2:])               # (B, Q, D)
    way = prototypes.shape[1]
    centres = batched_kmeans(queries, way, max_iter=config.kmeans_max_iter, n_init=config.kmeans_n_init,
                             seed=config.kmeans_seed).centres                          # (B, W, D)
    # squared Euclidean as a difference (not the expansion), so near-ties resolve as the release's NumPy does
    nearest = (prototypes.unsqueeze(2) - centres.unsqueeze(1)).pow(2).sum(-1).argmin(-1)  # (B, W)
    nearest_centres = torch.gather(centres, 1, nearest.unsqueeze(-1).expand(-1, -1, centres.shape[-1]))
    refined = F.normalize((nearest_centres + prototypes) / 2, dim=-1)
    return refined.reshape(*lead, *refined.shape[-2:])


def fusion_logits(visual_protos: torch.Tensor, semantic_protos: torch.Tensor, visual_query: torch.Tensor,
                  semantic_query: torch.Tensor, config: HeadConfig) -> torch.Tensor:
    """Fusion head: proto = lam*v_proto + (1-lam)*sem, query = lam*v_q + (1-lam)*s_q, scored by the metric.

    Args:
        visual_protos: (..., W, D) mean projected support (or its transductive refinement);
        semantic_protos: (..., W, D) class vectors; visual_query: (..., Q, D) projected queries;
        semantic_query: (..., Q, D) regressed queries.

    Returns:
        (..., Q, W) logits.
    """
    lam = config.lamda
    prototypes = lam * visual_protos + (1 - lam) * semantic_protos
    query = lam * visual_query + (1 - lam) * semantic_query
    return similarity_logits(query, prototypes, config.metric)


def concat_logits(visual_protos: torch.Tensor, semantic_protos: torch.Tensor, visual_query: torch.Tensor,
                  semantic_query: torch.Tensor, config: HeadConfig) -> torch.Tensor:
    """Concatenation head: proto = normalize([v_proto, sem]), query = normalize([v_q, s_q]) (2D-dim), scored
    by the metric. Arguments and result as :func:`fusion_logits` (the same order for both heads). A refined
    visual prototype is already unit norm while the class vector stays raw, as in the release.
    """
    prototypes = F.normalize(torch.cat([visual_protos, semantic_protos], -1), dim=-1)
    query = F.normalize(torch.cat([visual_query, semantic_query], -1), dim=-1)
    return similarity_logits(query, prototypes, config.metric)


HEAD_FUNCTIONS = {"fusion": fusion_logits, "concat": concat_logits}


class TasNet(nn.Module):
    """The meta model: ``feat_learner`` (visual projection) and ``word_learner`` (semantic regressor).

    State-dict keys ``feat_learner.{weight,bias}`` and ``word_learner.{weight,bias}``; both map F -> D.
    """

    def __init__(self, feature_dim: int, semantic_dim: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.feature_dim, self.semantic_dim = feature_dim, semantic_dim
        self.feat_learner = visual_projection(feature_dim, semantic_dim)
        self.word_learner = semantic_regressor(feature_dim, semantic_dim)

    def forward(self, support: torch.Tensor, query: torch.Tensor, semantic_protos: torch.Tensor,
                semantic_query: torch.Tensor, shot: int, transductive: bool = False) -> torch.Tensor:
        """Score the queries of one or B episodes.

        Args:
            support: (..., way*shot, F) shot-major; query: (..., Q, F);
            semantic_protos: (..., way, D); semantic_query: (..., Q, D).
            transductive: refine the visual prototypes with k-means on the projected queries first
                (:func:`refine_prototypes`; the release does so in training episodes too).

        Returns:
            (..., Q, way) logits.
        """
        way = semantic_protos.shape[-2]
        visual_protos = class_prototypes(self.feat_learner(support), way, shot)
        visual_query = self.feat_learner(query)
        if transductive:
            visual_protos = refine_prototypes(visual_protos, visual_query, self.config)
        return HEAD_FUNCTIONS[self.config.head](visual_protos, semantic_protos, visual_query, semantic_query,
                                                self.config)
