"""The one episode sampler and the episode contract.

An episode of ``way`` classes with ``shot`` support and ``query`` query samples per class is a flat index
vector of length ``way * (shot + query)`` in the original's *shot-major* order:
``[s0c0, s0c1, ..., s0c(way-1), s1c0, ...]`` for the support part, then the queries in the same order.
So the support labels are ``arange(way).repeat(shot)`` and the query labels ``arange(way).repeat(query)``.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from utils.io import InputError


class Episode(NamedTuple):
    """Support and query tensors of one episode, or of B episodes stacked on a leading dimension.

    Shapes: support (..., way*shot, F), support_labels (way*shot,), query (..., way*query, F),
    query_labels (way*query,). Labels are the same for every episode, so they are not batched.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


def episode_labels(way: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels of ``count`` samples per class in shot-major order: ``[0, 1, ..., way-1, 0, 1, ...]`` (way*count,)."""
    return torch.arange(way, device=device).repeat(count)


def split_episode(data: torch.Tensor, way: int, shot: int, query: int) -> Episode:
    """Cut shot-major episode data (..., way*(shot+query), F) into an :class:`Episode`, labels on its device."""
    n_support = way * shot
    if data.shape[-2] != way * (shot + query):
        raise ValueError(f"episode has {data.shape[-2]} samples, expected way*(shot+query) = {way * (shot + query)}")
    return Episode(data[..., :n_support, :], episode_labels(way, shot, data.device),
                   data[..., n_support:, :], episode_labels(way, query, data.device))


def check_episode_size(targets, way: int, shot: int, query: int, name: str = "split") -> torch.Tensor:
    """Refuse episodes the split cannot fill, naming ``name`` and the flag to lower; returns the class counts."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long).cpu())
    num_classes = int(counts.numel())
    if way > num_classes:
        raise InputError(f"{name}: way={way} but the split has only {num_classes} classes; lower --way.")
    if int(counts.min()) < shot + query:
        small = [c for c in range(num_classes) if counts[c] < shot + query]
        raise InputError(f"{name}: class {small[0]} has {int(counts[small[0]])} samples, fewer than "
                         f"shot+query = {shot}+{query} = {shot + query} ({len(small)} such classes); lower "
                         f"--shot or the query count.")
    return counts


class EpisodeSampler:
    """Draws N-way episodes of dataset indices.

    Args:
        targets: (N,) labels 0..C-1 of the split.
        way, shot, query: episode size.
        num_episodes: how many episodes one iteration yields.
        seed: when given, every iteration yields the *same* episodes (fixed validation/test episodes);
            otherwise the episodes come from torch's global RNG (seeded by ``utils.set_seed``).

    Iterating yields ``(way*(shot+query),)`` index tensors; :meth:`sample` draws many episodes at once as a
    ``(B, way*(shot+query))`` tensor, which is what the batched meta stage consumes.
    """

    def __init__(self, targets, way: int, shot: int, query: int, num_episodes: int, seed: int | None = None,
                 name: str = "split"):
        targets = torch.as_tensor(targets, dtype=torch.long).cpu()
        if min(way, shot, query, num_episodes) < 1:
            raise InputError(f"way, shot, query and the episode count must be >= 1, got way={way} shot={shot} "
                             f"query={query} episodes={num_episodes}")
        counts = check_episode_size(targets, way, shot, query, name)
        num_classes = int(counts.numel())
        self.way, self.shot, self.query, self.num_episodes = way, shot, query, num_episodes
        self.seed = seed
        # (C, max_count) table of the indices of every class, padded with -1 where a class is smaller.
        order = torch.argsort(targets, stable=True)
        max_count = int(counts.max())
        self.table = torch.full((num_classes, max_count), -1, dtype=torch.long)
        offsets = torch.cumsum(counts, 0) - counts
        position = torch.arange(targets.numel()) - offsets[targets[order]]
        self.table[targets[order], position] = order
        self.valid = self.table >= 0

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num`` episodes: (num, way*(shot+query)) indices, shot-major within each episode."""
        num_classes, max_count = self.table.shape
        classes = torch.argsort(torch.rand(num, num_classes, generator=generator), dim=1)[:, :self.way]
        keys = torch.rand(num, self.way, max_count, generator=generator)
        keys = keys.masked_fill(~self.valid[classes], 2.0)  # padding sorts last, never picked
        picks = torch.argsort(keys, dim=2)[..., :self.shot + self.query]           # (num, way, shot+query)
        indices = torch.gather(self.table[classes], 2, picks)                       # (num, way, shot+query)
        return indices.transpose(1, 2).reshape(num, -1)                             # shot-major

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        yield from self.sample(self.num_episodes, generator)
