"""The per-episode fit of the semantic regressor (DESIGN A5): both ways.

Every episode the regressor ``word_learner`` (640 -> D) takes ``steps`` Adam steps (fresh optimizer,
StepLR stepped after every step) on ``mean(1 - cos(regressor(support), class vector of its label))``, then
maps the queries to the semantic space. Nothing flows back into the outer loop.

- ``carry`` (the original release): one ``nn.Linear`` is fitted in place, episode after episode, so each
  episode starts where the previous one ended (:func:`fit_regressor`, plain ``torch.optim.Adam``).
- ``reset``: every episode starts from the same initial state, so episodes are independent and B of them
  are fitted at once with one weight tensor (B, D, F) and :class:`BatchedAdam`, the arithmetic of
  ``torch.optim.Adam`` (L2 weight decay folded into the gradient, bias correction, eps outside the square
  root) applied to all episodes in a few tensor ops (:func:`fit_regressors`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INNER_STATES = ("carry", "reset")


@dataclass(frozen=True)
class InnerLoopConfig:
    """Settings of the per-episode regressor fit (DESIGN A5 defaults; StepLR(50, 0.5) for concat on tiered/cub)."""

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


def fit_regressor(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor,
                  config: InnerLoopConfig) -> torch.Tensor:
    """Fit ``regressor`` in place on one episode with a fresh Adam + StepLR, as the original (carry mode).

    Args:
        regressor: Linear(F, D), updated in place.
        support: (S, F) support features (detached: the inner loop never reaches the outer parameters).
        targets: (S, D) class vector of each support sample's label.

    Returns:
        the loss of the last step (a 0-d tensor: no device sync here).
    """
    optimizer = torch.optim.Adam(regressor.parameters(), lr=config.lr, betas=config.betas, eps=config.eps,
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    support, targets = support.detach(), targets.detach()
    loss = torch.zeros(())
    # enable_grad: evaluation runs under no_grad, but the inner loop always needs gradients.
    with torch.enable_grad():
        for _ in range(config.steps):
            loss = cosine_loss(regressor(support), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return loss.detach()


class BatchedAdam:
    """``torch.optim.Adam`` (no amsgrad) on tensors whose leading dimension indexes independent episodes.

    Same arithmetic, in the same order, as the single-tensor path of ``torch.optim.Adam``::

        g = grad + weight_decay * p;  m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Every episode has its own moments; they share the step count and the learning rate, since all start
    together.
    """

    def __init__(self, params: list[torch.Tensor], config: InnerLoopConfig):
        self.params, self.config = params, config
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.denoms = [torch.empty_like(p) for p in params]  # reused: large allocations cost page faults on CPU
        self.step_count = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        """One Adam step; ``grads`` (same shapes as the parameters) are consumed (modified in place)."""
        beta1, beta2 = self.config.betas
        self.step_count += 1
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        for param, grad, exp_avg, exp_avg_sq, denom in zip(self.params, grads, self.exp_avgs, self.exp_avg_sqs,
                                                            self.denoms):
            grad.add_(param, alpha=self.config.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            torch.sqrt(exp_avg_sq, out=denom).div_(bias_correction2_sqrt).add_(self.config.eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def apply_regressors(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """B linear maps at once: weight (B, D, F), bias (B, D), inputs (B, N, F) -> (B, N, D)."""
    return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))


def fit_regressors(weight: torch.Tensor, bias: torch.Tensor, support: torch.Tensor, targets: torch.Tensor,
                   config: InnerLoopConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit B copies of one regressor state, one per episode, all at once (reset mode).

    Args:
        weight: (D, F) and bias: (D,) the common initial state (not modified).
        support: (B, S, F) support features of B episodes.
        targets: (B, S, D) class vector of each support sample's label.

    Returns:
        the fitted weights (B, D, F) and biases (B, D); episode b equals :func:`fit_regressor` on episode b.
    """
    num_episodes = support.shape[0]
    weights = weight.detach().unsqueeze(0).repeat(num_episodes, 1, 1)
    biases = bias.detach().unsqueeze(0).repeat(num_episodes, 1)
    support, targets = support.detach(), targets.detach()
    optimizer = BatchedAdam([weights, biases], config)
    with torch.enable_grad():
        weights.requires_grad_(True)
        biases.requires_grad_(True)
        for lr in config.learning_rates():
            # Summing the per-episode losses gives each episode's weights exactly its own gradient.
            loss = cosine_loss(apply_regressors(weights, biases, support), targets).sum()
            grad_weights, grad_biases = torch.autograd.grad(loss, (weights, biases))
            optimizer.step([grad_weights, grad_biases], lr)
    return weights.detach(), biases.detach()


def semantic_queries(regressor: nn.Linear, support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor,
                     config: InnerLoopConfig, inner_state: str = "reset", episode_batch: int = 100) -> torch.Tensor:
    """Fit the regressor on each episode's support set and map its queries: s_q of DESIGN A5.

    Args:
        regressor: Linear(F, D). ``carry`` fits it in place episode after episode (in order b = 0, 1, ...);
            ``reset`` leaves it untouched and starts every episode from its current state.
        support: (B, S, F); targets: (B, S, D); query: (B, Q, F).
        episode_batch: episodes fitted together in reset mode (memory grows with it, not with B).

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
            for start in range(0, support.shape[0], episode_batch):
                chunk = slice(start, start + episode_batch)
                weights, biases = fit_regressors(regressor.weight, regressor.bias, support[chunk], targets[chunk],
                                                 config)
                outputs.append(apply_regressors(weights, biases, query[chunk]))
    return torch.cat(outputs)
