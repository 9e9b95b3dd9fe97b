"""Datasets, the episode sampler, and raw-data preparation (``python -m dataloader.prepare``)."""
from dataloader.datasets import (DATASETS, SPLITS, FeatureSplit, ImageDataset, dataset_dir, feature_path,
                                 load_class_vectors, load_features, load_images)
from dataloader.sampler import Episode, EpisodeSampler, episode_labels, split_episode
from dataloader.transforms import normalization

__all__ = ["DATASETS", "SPLITS", "FeatureSplit", "ImageDataset", "dataset_dir", "feature_path",
           "load_class_vectors", "load_features", "load_images", "Episode", "EpisodeSampler",
           "episode_labels", "split_episode", "normalization"]
