"""The batched torch k-means against scikit-learn's KMeans on the same points."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.kmeans import batched_kmeans

sklearn_cluster = pytest.importorskip("sklearn.cluster")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def clustered_points(problems: int, k: int, per_cluster: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    """(problems, k*per_cluster, dim) points around k random centres per problem, float64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(problems, k, 1, dim, generator=g, dtype=torch.float64) * 10
    noise = torch.randn(problems, k, per_cluster, dim, generator=g, dtype=torch.float64) * spread
    points = (centres + noise).reshape(problems, k * per_cluster, dim)
    return points[:, torch.randperm(k * per_cluster, generator=g)]


@pytest.mark.slow
def test_same_partition_as_sklearn_on_separated_clusters():
    points = clustered_points(problems=12, k=5, per_cluster=15, dim=8, spread=0.5, seed=0)
    result = batched_kmeans(points, 5, seed=0)
    assert result.centres.shape == (12, 5, 8) and result.labels.shape == (12, 75)
    for b in range(points.shape[0]):
        reference = sklearn_cluster.KMeans(5, n_init=10, max_iter=1000, random_state=0).fit(points[b].numpy())
        assert sklearn_metrics.adjusted_rand_score(reference.labels_, result.labels[b].numpy()) == 1.0
        assert result.inertia[b].item() == pytest.approx(reference.inertia_, rel=1e-9)
        # the centres are the cluster means: every sklearn centre has a twin among ours
        gaps = torch.cdist(torch.from_numpy(reference.cluster_centers_), result.centres[b]).min(1).values
        assert gaps.max().item() < 1e-8


@pytest.mark.slow
def test_inertia_no_worse_than_sklearn_on_hard_data():
    # overlapping clusters: many local optima; both sides keep the best of 10 k-means++ seedings
    points = clustered_points(problems=16, k=5, per_cluster=15, dim=8, spread=8.0, seed=1)
    ours = batched_kmeans(points, 5, seed=0).inertia.numpy()
    theirs = np.array([sklearn_cluster.KMeans(5, n_init=10, max_iter=1000, random_state=0).fit(p.numpy()).inertia_
                       for p in points])
    assert ours.mean() <= theirs.mean() * (1 + 1e-3)
    assert (ours <= theirs * 1.05).all()


def test_deterministic_single_problem_and_inertia_matches_labels():
    points = clustered_points(problems=1, k=3, per_cluster=10, dim=4, spread=3.0, seed=2)[0].float()
    first, second = batched_kmeans(points, 3, seed=7), batched_kmeans(points, 3, seed=7)
    assert first.centres.shape == (3, 4) and first.labels.shape == (30,)
    assert torch.equal(first.centres, second.centres) and torch.equal(first.labels, second.labels)
    own_centres = first.centres[first.labels]
    assert first.inertia.item() == pytest.approx((points - own_centres).pow(2).sum().item(), rel=1e-4)


def test_fewer_distinct_points_than_k_stay_finite_and_k_above_n_is_refused():
    points = torch.zeros(2, 10, 3)
    points[1, :5] = 1.0                                   # two distinct locations for k = 3
    result = batched_kmeans(points, 3)
    assert torch.isfinite(result.centres).all()
    assert result.inertia.abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        batched_kmeans(points, 11)
