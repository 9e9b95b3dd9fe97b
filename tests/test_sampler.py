"""The episode sampler: shot-major order, labels, seeding, argument checks."""
from __future__ import annotations

import pytest
import torch

from dataloader import EpisodeSampler, episode_labels, split_episode
from utils import InputError


def make_targets(counts):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def test_episodes_are_shot_major_with_distinct_classes():
    targets = make_targets([20] * 10)
    way, shot, query = 5, 2, 3
    sampler = EpisodeSampler(targets, way, shot, query, num_episodes=50, seed=1)
    for indices in sampler:
        assert indices.shape == (way * (shot + query),)
        assert indices.unique().numel() == indices.numel()  # no sample twice
        labels = targets[indices].view(shot + query, way)   # row r = r-th sample of every class
        assert (labels == labels[0]).all()                  # column j is one class throughout
        assert labels[0].unique().numel() == way


def test_split_episode_takes_the_first_shot_rows_as_support():
    """episode_labels repeats 0..way-1 per row; split_episode cuts shot-major rows, with or without a batch axis."""
    assert episode_labels(3, 2).tolist() == [0, 1, 2, 0, 1, 2]
    data = torch.arange(3 * (1 + 2)).float().view(-1, 1)
    episode = split_episode(data, way=3, shot=1, query=2)
    assert episode.support.squeeze(1).tolist() == [0, 1, 2]
    assert episode.query.squeeze(1).tolist() == [3, 4, 5, 6, 7, 8]
    assert episode.support_labels.tolist() == [0, 1, 2]
    assert episode.query_labels.tolist() == [0, 1, 2, 0, 1, 2]
    batched = split_episode(data.expand(4, -1, -1), way=3, shot=1, query=2)
    assert batched.support.shape == (4, 3, 1) and batched.query.shape == (4, 6, 1)


def test_seeded_sampler_repeats_its_episodes_and_unseeded_does_not():
    targets = make_targets([30] * 8)
    fixed = EpisodeSampler(targets, 5, 1, 15, num_episodes=10, seed=7)
    assert torch.equal(torch.stack(list(fixed)), torch.stack(list(fixed)))
    free = EpisodeSampler(targets, 5, 1, 15, num_episodes=10)
    assert not torch.equal(torch.stack(list(free)), torch.stack(list(free)))


def test_sample_n_equals_n_iterated_episodes():
    targets = make_targets([25] * 12)
    sampler = EpisodeSampler(targets, 5, 1, 15, num_episodes=6, seed=3)
    batch = sampler.sample(6, torch.Generator().manual_seed(3))
    assert torch.equal(batch, torch.stack(list(sampler)))


def test_unequal_class_sizes_never_pick_padding():
    targets = make_targets([5, 40, 6, 33, 5, 9])
    sampler = EpisodeSampler(targets, 6, 1, 4, num_episodes=200, seed=0)
    for indices in sampler:
        assert (indices >= 0).all()
        assert targets[indices].view(5, 6).eq(targets[indices][:6]).all()


def test_classes_are_picked_uniformly():
    targets = make_targets([10] * 10)
    picks = torch.cat([targets[e[:5]] for e in EpisodeSampler(targets, 5, 1, 1, num_episodes=4000, seed=0)])
    freq = torch.bincount(picks, minlength=10).float() / picks.numel()
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.01)


@pytest.mark.parametrize("kwargs, message", [
    (dict(way=11, shot=1, query=1), "way=11 but the split has only 10 classes"),
    (dict(way=5, shot=5, query=16), "shot+query = 5+16 = 21"),
    (dict(way=0, shot=1, query=1), "must be >= 1"),
])
def test_bad_arguments_name_the_numbers(kwargs, message):
    with pytest.raises(InputError, match=message.replace("+", r"\+")):
        EpisodeSampler(make_targets([20] * 10), num_episodes=5, **kwargs)
