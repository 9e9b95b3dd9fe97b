"""The per-episode fit of the semantic regressor: both ways, one fast path.

Every episode the regressor ``word_learner`` (F -> D) takes ``steps`` Adam steps (fresh optimizer, StepLR
stepped after every step) on ``mean(1 - cos(regressor(support), class vector of its label))``, then maps the
queries to the semantic space. Nothing flows back into the outer loop.

- ``carry`` (the original release): one ``nn.Linear`` is fitted in place, episode after episode, so each
  episode starts where the previous one ended (:func:`fit_regressor`).
- ``reset``: every episode starts from the same initial state, so episodes are independent and B of them are
  fitted at once, with weights (B, D, F) (:func:`fit_regressors`).

:func:`plain_fit_regressor` is the definition, written as the original does it: autograd through
``F.cosine_similarity`` and ``torch.optim.Adam``. Both modes run :func:`fit_in_place` instead, the same
arithmetic with the Python and memory overhead removed (the inner loop is 100 steps per episode, so it is
where the meta stage spends its time):

* the gradient of mean(1 - cos) is written in closed form (:func:`cosine_loss_grad`) into preallocated
  buffers, so no autograd graph is built and no (B, D, F) tensor is allocated per step;
* the Adam update is one fused kernel over weights, gradient and both moments (``torch._fused_adam_``, the
  kernel behind ``torch.optim.Adam(fused=True)``, called directly: the optimizer object's bookkeeping costs
  about as much as the kernel at these sizes);
* on a CPU the episodes are fitted a few at a time (:func:`fit_batch_size`): the work per step is a pass over
  every episode's D x F weights and moments, and it runs from the caches only while they stay small;
* on a CPU with more than one torch thread (``--threads``), reset mode fits those chunks in parallel, one
  chunk per worker thread, each worker's ops on one intra-op thread (:func:`fit_workers`): torch releases the
  GIL inside its ops, and one thread per small op avoids OpenMP's synchronisation, which on a busy machine
  cost more than the op. The chunks are the same as with one thread and each is computed by the same ops, so
  the result is bit-identical to the sequential path.

Tests hold the fast path to the plain one (``tests/test_inner_loop.py``): equal to 1e-9 in float64; in float32
to 1e-5 for all but rare elements (at most ~2e-4, where a converged fit's rounding-level gradients meet Adam's
normalisation), with identical predictions.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INNER_STATES = ("carry", "reset")

# On a CPU, episodes fitted together hold at most this many weights (~1.5 MB per float32 tensor): measured on a
# 2-core EPYC (1 MiB L2, 32 MiB L3), one to two D = 300 episodes per chunk ran 1.3-1.5x faster than 8 to 60.
CPU_FIT_ELEMENTS = 400_000


@dataclass(frozen=True)
class InnerLoopConfig:
    """Settings of the per-episode regressor fit (the release's defaults; StepLR(50, 0.5) for concat on tiered/cub)."""

    steps: int = 100
    lr: float = 0.01            # the original's --gradlr
    weight_decay: float = 1e-5
    step_size: int = 10         # StepLR stepped after every inner step
    gamma: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def learning_rates(self) -> list[float]:
        """The learning rate of every inner step, multiplied by ``gamma`` every ``step_size`` steps as StepLR does."""
        rates, lr = [], self.lr
        for step in range(self.steps):
            rates.append(lr)
            if (step + 1) % self.step_size == 0:
                lr *= self.gamma
        return rates


def cosine_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over the last dimension: (..., S, D), (..., S, D) -> (...,), one loss per episode."""
    return (1 - F.cosine_similarity(predictions, targets, dim=-1)).mean(-1)


def plain_fit_regressor(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor,
                        config: InnerLoopConfig) -> torch.Tensor:
    """The definition of one episode's fit, as the original: autograd + a fresh ``torch.optim.Adam`` + StepLR.

    Args:
        regressor: Linear(F, D), updated in place.
        support: (S, F) support features; targets: (S, D) class vector of each support sample's label.

    Returns:
        the loss of the last step (0-d).
    """
    optimizer = torch.optim.Adam(regressor.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    support, targets = support.detach(), targets.detach()
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(config.steps):
            loss = cosine_loss(regressor(support), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return loss.detach()


def cosine_loss_grad(predictions: torch.Tensor, unit_targets: torch.Tensor,
                     eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines of :func:`cosine_loss` and the loss's gradient, without autograd.

    With y = predictions, t = unit_targets (already divided by their norms) and cos = y.t / |y|, the gradient
    of mean_s(1 - cos_s) is (cos * y / |y| - t) / (|y| S). Norms are clamped at ``eps`` as
    ``F.cosine_similarity`` does (a zero class vector, e.g. a word missing from GloVe, gives zero gradient).

    Args:
        predictions: (B, S, D); unit_targets: (B, S, D).

    Returns:
        cos (B, S, 1), from which the loss is (1 - cos).mean((-2, -1)), and the gradient (B, S, D).
    """
    norm = torch.linalg.vector_norm(predictions, dim=-1, keepdim=True).clamp_min_(eps)    # (B, S, 1)
    cos = (predictions * unit_targets).sum(-1, keepdim=True).div_(norm)                     # (B, S, 1)
    scale = predictions.shape[-2] * norm                                                     # S |y|
    grad = predictions * (cos / (scale * norm)) - unit_targets / scale
    return cos, grad


@torch.no_grad()
def fit_in_place(weights: torch.Tensor, biases: torch.Tensor, support: torch.Tensor, targets: torch.Tensor,
                 config: InnerLoopConfig) -> torch.Tensor:
    """Fit B independent regressors in place, each with its own fresh Adam + StepLR (the fast path).

    Episode b gets exactly the updates :func:`plain_fit_regressor` would give a Linear holding weights[b] and
    biases[b]: its loss depends only on its own weights, so its gradient is its own.

    Args:
        weights: (B, D, F) and biases: (B, D), updated in place (views of a module's parameters work too).
        support: (B, S, F) support features; targets: (B, S, D) class vector of each support sample's label.

    Returns:
        the loss of the last step per episode (B,).
    """
    unit_targets = targets / torch.linalg.vector_norm(targets, dim=-1, keepdim=True).clamp_min(config.eps)
    grad_weights, grad_biases = torch.empty_like(weights), torch.empty_like(biases)
    predictions = weights.new_empty(support.shape[:2] + biases.shape[-1:])                  # (B, S, D)
    exp_avgs = [torch.zeros_like(weights), torch.zeros_like(biases)]
    exp_avg_sqs = [torch.zeros_like(weights), torch.zeros_like(biases)]
    # Adam's step count, one per tensor as torch.optim keeps it (float32 on the tensors' device)
    steps = [torch.zeros((), device=weights.device) for _ in range(2)]
    beta1, beta2 = config.betas
    cos = torch.ones(weights.shape[0], 1, 1, device=weights.device, dtype=weights.dtype)  # no step: loss 0
    for lr in config.learning_rates():
        torch.baddbmm(biases.unsqueeze(1), support, weights.transpose(1, 2), out=predictions)
        cos, grad = cosine_loss_grad(predictions, unit_targets)
        torch.bmm(grad.transpose(1, 2), support, out=grad_weights)
        torch.sum(grad, dim=1, out=grad_biases)
        torch._foreach_add_(steps, 1)
        # L2 weight decay folded into the gradient and eps outside the square root, as torch.optim.Adam
        torch._fused_adam_([weights, biases], [grad_weights, grad_biases], exp_avgs, exp_avg_sqs, [], steps,
                           lr=lr, beta1=beta1, beta2=beta2, weight_decay=config.weight_decay, eps=config.eps,
                           amsgrad=False, maximize=False)
    return (1 - cos).mean((-2, -1))


def fit_regressor(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor,
                  config: InnerLoopConfig) -> torch.Tensor:
    """Fit ``regressor`` in place on one episode with a fresh Adam + StepLR (carry mode; the fast path).

    Args:
        regressor: Linear(F, D), updated in place.
        support: (S, F); targets: (S, D).

    Returns:
        the loss of the last step (0-d; no device sync here).
    """
    # (1, D, F) and (1, D) views of the parameters: the update lands in the regressor itself
    loss = fit_in_place(regressor.weight.unsqueeze(0), regressor.bias.unsqueeze(0), support.unsqueeze(0),
                        targets.unsqueeze(0), config)
    return loss[0]


def apply_regressors(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """B linear maps at once: weight (B, D, F), bias (B, D), inputs (B, N, F) -> (B, N, D)."""
    return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))


def fit_regressors(weight: torch.Tensor, bias: torch.Tensor, support: torch.Tensor, targets: torch.Tensor,
                   config: InnerLoopConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit B copies of one regressor state, one per episode, all at once (reset mode).

    Args:
        weight: (D, F) and bias: (D,) the common initial state (not modified).
        support: (B, S, F) support features of B episodes; targets: (B, S, D).

    Returns:
        the fitted weights (B, D, F) and biases (B, D); episode b equals :func:`plain_fit_regressor` on episode b.
    """
    num_episodes = support.shape[0]
    weights = weight.detach().unsqueeze(0).repeat(num_episodes, 1, 1)
    biases = bias.detach().unsqueeze(0).repeat(num_episodes, 1)
    fit_in_place(weights, biases, support, targets, config)
    return weights, biases


def fit_batch_size(regressor: nn.Linear, num_episodes: int) -> int:
    """Episodes to fit together in reset mode: all of them on a GPU; on a CPU as many as keep the weights of a
    chunk under :data:`CPU_FIT_ELEMENTS` (at least one)."""
    if regressor.weight.device.type != "cpu":
        return max(1, num_episodes)
    return max(1, min(num_episodes, CPU_FIT_ELEMENTS // regressor.weight.numel()))


def fit_workers(regressor: nn.Linear, num_chunks: int) -> int:
    """Worker threads for reset mode's chunks: on a CPU, torch's thread count (``--threads``; 0 = one per core),
    never more than the chunks; 1 (the sequential path) on a GPU, where one chunk holds every episode."""
    if regressor.weight.device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), num_chunks))


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, kept between calls (the trainer calls once per batch)."""
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="inner_loop")
        return _POOLS[workers]


def _forget_pools() -> None:
    """In a forked child (e.g. a DataLoader worker) the parent's pool threads do not exist."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOLS.clear()


os.register_at_fork(after_in_child=_forget_pools)


def _reset_chunk(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                 config: InnerLoopConfig, one_thread: bool = False) -> torch.Tensor:
    """Fit one chunk of episodes from the regressor's state and map its queries: (b, Q, D)."""
    if one_thread:
        # per calling thread (OpenMP's thread count and MKL's local one): the caller's setting is untouched
        torch.set_num_threads(1)
    with torch.no_grad():
        weights, biases = fit_regressors(regressor.weight, regressor.bias, support, targets, config)
        return apply_regressors(weights, biases, query)


def fit_semantic_regressor(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                           config: InnerLoopConfig, inner_state: str = "reset",
                           fit_batch: int | None = None) -> torch.Tensor:
    """Fit the regressor on each episode's support set and map its queries: the semantic queries s_q.

    Args:
        regressor: Linear(F, D). ``carry`` fits it in place episode after episode (in order b = 0, 1, ...);
            ``reset`` leaves it untouched and starts every episode from its current state.
        support: (B, S, F); targets: (B, S, D); query: (B, Q, F).
        fit_batch: reset mode, episodes fitted together (default :func:`fit_batch_size`); results do not depend
            on it. On a CPU the chunks run on :func:`fit_workers` threads (bit-identical to one thread).

    Returns:
        (B, Q, D) semantic embeddings of the queries, detached.
    """
    if inner_state not in INNER_STATES:
        raise ValueError(f"inner_state must be one of {INNER_STATES}, got {inner_state!r}")
    outputs = []
    with torch.no_grad():
        if inner_state == "carry":
            for episode in range(support.shape[0]):
                fit_regressor(regressor, support[episode], targets[episode], config)
                outputs.append(regressor(query[episode]).unsqueeze(0))
        else:
            fit_batch = fit_batch or fit_batch_size(regressor, support.shape[0])
            chunks = [slice(start, start + fit_batch) for start in range(0, support.shape[0], fit_batch)]
            workers = fit_workers(regressor, len(chunks))
            if workers == 1:
                outputs = [_reset_chunk(regressor, support[c], targets[c], query[c], config) for c in chunks]
            else:
                outputs = list(_pool(workers).map(
                    lambda c: _reset_chunk(regressor, support[c], targets[c], query[c], config, one_thread=True),
                    chunks))
    return torch.cat(outputs)


# The name the release-fidelity tests and earlier code call it by.
semantic_queries = fit_semantic_regressor
