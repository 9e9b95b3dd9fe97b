"""The semantic regressor's inner loop: the fast path (closed-form gradient + fused Adam, batched in reset mode)
equals the plain per-episode autograd + torch.optim.Adam loop, and carry mode carries."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from models.heads import semantic_regressor
import models.inner_loop as inner_loop
from models.inner_loop import (CPU_FIT_ELEMENTS, InnerLoopConfig, apply_regressors, cosine_loss, cosine_loss_grad,
                               fit_batch_size, fit_regressor, fit_regressors, fit_workers, plain_fit_regressor,
                               semantic_queries)

FEATURES, DIM = 640, 16
# 20 steps with StepLR(8, 0.2) cover three learning-rate levels and keep the plain loop quick.
CONFIG = InnerLoopConfig(steps=20, lr=0.01, weight_decay=1e-5, step_size=8, gamma=0.2)


pytestmark = pytest.mark.usefixtures("one_thread")


def episodes(count: int, support: int = 5, query: int = 6, seed: int = 0):
    """support (B, S, F) non-negative like ReLU features, targets (B, S, D), query (B, Q, F), class vectors."""
    g = torch.Generator().manual_seed(seed)
    class_vectors = torch.randn(count, support, DIM, generator=g)
    return (torch.rand(count, support, FEATURES, generator=g), class_vectors,
            torch.rand(count, query, FEATURES, generator=g))


def regressor(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return semantic_regressor(FEATURES, DIM)


def test_learning_rates_follow_step_lr():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=CONFIG.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=CONFIG.step_size, gamma=CONFIG.gamma)
    expected = []
    for _ in range(CONFIG.steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert CONFIG.learning_rates() == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_gradient_equals_autograd(dtype):
    g = torch.Generator().manual_seed(3)
    predictions = torch.randn(4, 7, DIM, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randn(4, 7, DIM, generator=g, dtype=dtype)
    targets[1, 2] = 0                                     # a class vector of zeros (a word missing from GloVe)
    predictions.data[2, 3] *= 1e3                         # norms far from 1 on both sides
    predictions.data[3, 1] *= 1e-3
    expected = cosine_loss(predictions, targets)
    (grad,) = torch.autograd.grad(expected.sum(), predictions)
    unit = targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos, ours = cosine_loss_grad(predictions.detach(), unit)
    loss = (1 - cos).mean((-2, -1))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=tolerance)
    torch.testing.assert_close(ours, grad, rtol=tolerance, atol=tolerance)
    assert torch.equal(ours[1, 2], torch.zeros(DIM, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_carry_step_equals_plain_autograd_adam(dtype):
    """One episode in place (carry): the fast path against autograd + torch.optim.Adam, several episodes on."""
    support, targets, _ = (t.to(dtype) for t in episodes(3, seed=11))
    fast, plain = regressor().to(dtype), regressor().to(dtype)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for b in range(3):
        fast_loss = fit_regressor(fast, support[b], targets[b], CONFIG)
        plain_loss = plain_fit_regressor(plain, support[b], targets[b], CONFIG)
        torch.testing.assert_close(fast.weight, plain.weight, rtol=0, atol=tolerance)
        torch.testing.assert_close(fast.bias, plain.bias, rtol=0, atol=tolerance)
        torch.testing.assert_close(fast_loss, plain_loss, rtol=0, atol=tolerance)
    assert fast.weight.requires_grad and isinstance(fast.weight, torch.nn.Parameter)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("count", [1, 7, 64])
def test_batched_reset_equals_per_episode_adam(count, dtype):
    """Same weights and identical predictions. In float64 the two paths agree to rounding. In float32 they
    agree to ~1e-5 except rare elements: once an episode's fit has converged its gradients are at rounding
    level, Adam's m / sqrt(v) turns them into +-lr steps, and the closed-form gradient and the fused kernel
    round in another order than autograd and torch.optim.Adam, so such an element may move by up to ~2e-4
    (largest seen over 6 x 64 episodes: 1.6e-4, one element in 10,240; the rest agree to 1e-5)."""
    support, targets, query = (t.to(dtype) for t in episodes(count, seed=count))
    initial = regressor().to(dtype)
    weights, biases = fit_regressors(initial.weight, initial.bias, support, targets, CONFIG)
    batched_out = apply_regressors(weights, biases, query)
    tolerance = 1e-9 if dtype == torch.float64 else 5e-4
    close_fraction = []
    for b in range(count):
        plain = copy.deepcopy(initial)
        plain_fit_regressor(plain, support[b], targets[b], CONFIG)
        torch.testing.assert_close(weights[b], plain.weight.detach(), rtol=0, atol=tolerance)
        torch.testing.assert_close(biases[b], plain.bias.detach(), rtol=0, atol=tolerance)
        close_fraction.append(((weights[b] - plain.weight).abs() <= 1e-5).float().mean().item())
        with torch.no_grad():
            plain_out = plain(query[b])
        torch.testing.assert_close(batched_out[b], plain_out, rtol=0, atol=10 * tolerance)
        # identical predictions: the nearest class vector (cosine) of every query
        def predict(out):
            return F.normalize(out, dim=-1) @ F.normalize(targets[b], dim=-1).T
        assert torch.equal(predict(batched_out[b]).argmax(-1), predict(plain_out).argmax(-1))
    assert min(close_fraction) > 0.999
    # the initial state is left as it was
    torch.testing.assert_close(initial.weight, regressor().weight.to(dtype), rtol=0, atol=0)


def test_reset_is_independent_of_the_fit_batch_and_leaves_the_regressor():
    support, targets, query = (t.double() for t in episodes(9, seed=4))   # float64: see the test above
    model = regressor().double()
    before = copy.deepcopy(model.state_dict())
    whole = semantic_queries(model, support, targets, query, CONFIG, "reset", fit_batch=9)
    chunked = semantic_queries(model, support, targets, query, CONFIG, "reset", fit_batch=4)
    automatic = semantic_queries(model, support, targets, query, CONFIG, "reset")
    torch.testing.assert_close(whole, automatic, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-6)
    assert whole.shape == (9, 6, DIM) and not whole.requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_carry_continues_from_the_previous_episode():
    support, targets, query = episodes(2, seed=5)
    carried = regressor()
    out = semantic_queries(carried, support, targets, query, CONFIG, "carry")
    by_hand = regressor()
    plain_fit_regressor(by_hand, support[0], targets[0], CONFIG)
    after_first = copy.deepcopy(by_hand)
    plain_fit_regressor(by_hand, support[1], targets[1], CONFIG)   # episode 2 starts where episode 1 ended
    torch.testing.assert_close(carried.weight, by_hand.weight, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(out[0], after_first(query[0]), rtol=0, atol=1e-3)
        torch.testing.assert_close(out[1], by_hand(query[1]), rtol=0, atol=1e-3)
    # ... which is not what a fresh start on episode 2 gives
    fresh = regressor()
    fit_regressor(fresh, support[1], targets[1], CONFIG)
    assert (fresh.weight - carried.weight).abs().max() > 1e-2


def test_inner_loop_runs_under_no_grad_and_reduces_the_loss():
    support, targets, query = episodes(3, seed=6)
    model = regressor()
    with torch.no_grad():
        before = (1 - F.cosine_similarity(model(support), targets, dim=-1)).mean()
        weights, biases = fit_regressors(model.weight, model.bias, support, targets, CONFIG)
        after = (1 - F.cosine_similarity(apply_regressors(weights, biases, support), targets, dim=-1)).mean()
    assert after < before * 0.5


def test_cpu_fit_batch_is_the_most_episodes_whose_weights_stay_under_the_limit():
    for regressor in (torch.nn.Linear(640, 300), torch.nn.Linear(640, 50)):
        size, per_episode = fit_batch_size(regressor, 100), regressor.weight.numel()
        assert 1 <= size < 100 and size * per_episode <= CPU_FIT_ELEMENTS < (size + 1) * per_episode
    assert fit_batch_size(torch.nn.Linear(640, 50), 3) == 3
    assert fit_batch_size(torch.nn.Linear(4096, 4096), 100) == 1


def test_parallel_reset_is_bit_identical_to_one_thread(monkeypatch):
    """With --threads N > 1 the chunks run on N worker threads of one intra-op thread each; the result is the
    sequential one bit for bit, and the caller's thread count is left as it was."""
    support, targets, query = episodes(9, seed=8)                  # float32: bitwise, not to a tolerance
    model = regressor()
    sequential = semantic_queries(model, support, targets, query, CONFIG, "reset", fit_batch=2)   # 1 thread
    seen = []
    chunk = inner_loop._reset_chunk

    def recording(*args, **kwargs):
        out = chunk(*args, **kwargs)
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return out

    monkeypatch.setattr(inner_loop, "_reset_chunk", recording)
    torch.set_num_threads(3)
    assert fit_workers(model, 5) == 3 and fit_workers(model, 2) == 2
    parallel = semantic_queries(model, support, targets, query, CONFIG, "reset", fit_batch=2)
    assert torch.get_num_threads() == 3
    assert torch.equal(parallel, sequential)
    assert len(seen) == 5 and all(name.startswith("inner_loop") and threads == 1 for name, threads in seen)
    # one thread: the sequential path, in the calling thread
    torch.set_num_threads(1)
    seen.clear()
    assert torch.equal(semantic_queries(model, support, targets, query, CONFIG, "reset", fit_batch=2), sequential)
    assert [name for name, _ in seen] == [threading.current_thread().name] * 5


def test_fit_workers_is_one_off_the_cpu():
    assert fit_workers(torch.nn.Linear(640, 300, device="meta"), 50) == 1
    torch.set_num_threads(2)
    assert fit_workers(torch.nn.Linear(640, 300), 1) == 1
