"""Batched k-means in torch: many small clustering problems (one per episode) in one set of tensor ops.

The transductive setting clusters the projected queries of every test episode (k = way). Running
scikit-learn once per episode costs a device -> host copy and a Python call per episode; this module
solves B problems at once on whatever device the points live on, with scikit-learn's algorithm:
greedy k-means++ seeding (``2 + log k`` candidates per centre), Lloyd iterations until the assignment
stops changing or the centres move less than ``tol`` times the mean per-feature variance, empty clusters
moved to the points farthest from their centre, and the best of ``n_init`` seedings by inertia.
``n_init = 10`` is scikit-learn's default before version 1.4, i.e. what the original code ran.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class KMeansResult(NamedTuple):
    """centres (B, k, D); labels (B, N) in 0..k-1; inertia (B,) sum of squared distances to the centres."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor


def squared_distances(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(P, N, D) x (P, k, D) -> (P, N, k) squared Euclidean distances (clamped at 0 against rounding)."""
    cross = torch.bmm(points, centres.transpose(1, 2))
    dist = points.pow(2).sum(-1, keepdim=True) - 2 * cross + centres.pow(2).sum(-1).unsqueeze(1)
    return dist.clamp_min_(0)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding of P problems: (P, N, D) -> (P, k, D) initial centres."""
    num_problems, num_points, _ = points.shape
    rows = torch.arange(num_problems, device=points.device)
    trials = 2 + int(math.log(k))
    first = torch.randint(num_points, (num_problems,), generator=generator, device=points.device)
    centres = [points[rows, first]]
    closest = squared_distances(points, centres[0].unsqueeze(1)).squeeze(2)            # (P, N)
    for _ in range(1, k):
        # A problem whose points all coincide has no mass to sample from: sample uniformly instead.
        weights = closest + (closest.sum(1, keepdim=True) <= 0).to(closest.dtype)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)  # (P, T)
        candidate_points = torch.gather(points, 1, candidates.unsqueeze(-1).expand(-1, -1, points.shape[2]))
        to_candidates = squared_distances(points, candidate_points)                      # (P, N, T)
        potentials = torch.minimum(closest.unsqueeze(2), to_candidates).sum(1)           # (P, T)
        best = potentials.argmin(1)
        centres.append(candidate_points[rows, best])
        closest = torch.minimum(closest, to_candidates[rows, :, best])
    return torch.stack(centres, 1)


def lloyd(points: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: torch.Tensor) -> torch.Tensor:
    """Lloyd iterations on P problems until each converges; (P, N, D), (P, k, D) -> (P, k, D) centres.

    A problem stops when its assignment repeats or its centres move (summed squared shift) by at most its
    ``tol`` (P,); stopped problems are frozen while the others go on.
    """
    num_problems, _, dim = points.shape
    k = centres.shape[1]
    active = torch.ones(num_problems, dtype=torch.bool, device=points.device)
    previous = None
    for _ in range(max_iter):
        dist = squared_distances(points, centres)
        labels = dist.argmin(2)                                                          # (P, N)
        one_hot = torch.nn.functional.one_hot(labels, k).to(points.dtype)                # (P, N, k)
        counts = one_hot.sum(1)                                                          # (P, k)
        sums = torch.bmm(one_hot.transpose(1, 2), points)                                # (P, k, D)
        new_centres = sums / counts.clamp_min(1).unsqueeze(2)
        empty = counts == 0
        if bool(empty.any()):
            # As scikit-learn: an empty cluster takes the point farthest from its current centre.
            own = dist.gather(2, labels.unsqueeze(2)).squeeze(2)                         # (P, N)
            far_order = own.argsort(1, descending=True)
            rank = (empty.cumsum(1) - 1).clamp_min(0)                                    # j-th empty -> j-th farthest
            far_points = torch.gather(points, 1, far_order.gather(1, rank).unsqueeze(2).expand(-1, -1, dim))
            new_centres = torch.where(empty.unsqueeze(2), far_points, new_centres)
        shift = (new_centres - centres).pow(2).sum((1, 2))
        centres = torch.where(active[:, None, None], new_centres, centres)
        converged = shift <= tol
        if previous is not None:
            converged |= (labels == previous).all(1)
        active &= ~converged
        previous = labels
        if not bool(active.any()):
            break
    return centres


def batched_kmeans(points: torch.Tensor, k: int, max_iter: int = 1000, n_init: int = 10, tol: float = 1e-4,
                   seed: int = 0) -> KMeansResult:
    """Cluster each of B point sets into ``k`` clusters.

    Args:
        points: (B, N, D) (or (N, D) for one problem, then the result has no batch dimension).
        k: clusters per problem (k <= N).
        max_iter: Lloyd iterations at most.
        n_init: seedings per problem; the one of lowest inertia is kept.
        tol: relative tolerance, scaled by the mean per-feature variance of each problem (as scikit-learn).
        seed: the seed of the k-means++ sampling, so that the same points give the same clusters.

    Returns:
        :class:`KMeansResult` with centres (B, k, D), labels (B, N), inertia (B,).
    """
    if points.dim() == 2:
        centres, labels, inertia = batched_kmeans(points.unsqueeze(0), k, max_iter, n_init, tol, seed)
        return KMeansResult(centres[0], labels[0], inertia[0])
    num_batch, num_points, dim = points.shape
    if not 1 <= k <= num_points:
        raise ValueError(f"k-means: k={k} clusters need 1 <= k <= number of points ({num_points})")
    generator = torch.Generator(device=points.device).manual_seed(seed)
    # Centring changes nothing mathematically and keeps the |x|^2 - 2xc + |c|^2 expansion precise.
    mean = points.mean(1, keepdim=True)
    points = points - mean
    repeated = points.repeat_interleave(n_init, 0)                                       # (B*n_init, N, D)
    tolerance = (tol * points.var(1, unbiased=False).mean(1)).repeat_interleave(n_init)
    centres = lloyd(repeated, kmeans_plus_plus(repeated, k, generator), max_iter, tolerance)
    dist = squared_distances(repeated, centres)
    inertia, labels = dist.min(2)
    inertia = inertia.sum(1).view(num_batch, n_init)
    best = inertia.argmin(1)
    rows = torch.arange(num_batch, device=points.device)
    centres = centres.view(num_batch, n_init, k, dim)[rows, best]
    labels = labels.view(num_batch, n_init, num_points)[rows, best]
    return KMeansResult(centres + mean, labels, inertia[rows, best])
