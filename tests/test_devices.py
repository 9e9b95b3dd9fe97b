"""The device paths: augmentation and inner loop give on ``device`` what they give on the CPU; k-means finds the
planted clusters and the heads equal a float64 computation, on every device.

Every test takes a ``device`` parameter: ``cpu`` always, ``cuda`` where a GPU is present (skipped elsewhere),
so the same checks run in CI on a CPU and on a GPU machine (``bench/gpu_run.py`` runs this file first).
"""
from __future__ import annotations

import copy

import pytest
import torch

from dataloader.batch_augment import eval_transform, resized_crop, sample_crop_boxes, train_augment
from models.heads import HeadConfig, TasNet, semantic_regressor
from models.inner_loop import InnerLoopConfig, fit_regressors, apply_regressors, plain_fit_regressor, semantic_queries
from models.kmeans import batched_kmeans

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
MEAN, STD = (0.47, 0.45, 0.41), (0.28, 0.27, 0.29)
CONFIG = InnerLoopConfig(steps=20, step_size=8)
FEATURES, DIM = 64, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """TF32 would blur the comparisons with the CPU on a GPU that has it."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def images(count: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 images (B, H, W, 3): interpolation errors stay small on them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def episodes(count: int, support: int = 5, query: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, support, FEATURES, generator=g), torch.randn(count, support, DIM, generator=g),
            torch.rand(count, query, FEATURES, generator=g))


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_on_the_device_equals_the_cpu(device):
    batch = images(6)
    boxes = sample_crop_boxes(6, 40, 40, generator=torch.Generator().manual_seed(1))
    flip = torch.tensor([True, False, True, False, False, True])
    expected = resized_crop(batch, boxes, 32, flip)
    ours = resized_crop(batch.to(device), boxes.to(device), 32, flip.to(device))
    assert ours.device.type == device
    torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(eval_transform(batch.to(device), MEAN, STD, 32, 36).cpu(),
                               eval_transform(batch, MEAN, STD, 32, 36), rtol=0, atol=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    out = train_augment(batch.to(device), MEAN, STD, generator, 32, channels_last=True)
    assert out.shape == (6, 3, 32, 32) and out.device.type == device and torch.isfinite(out).all()
    assert out.is_contiguous(memory_format=torch.channels_last)
    again = train_augment(batch.to(device), MEAN, STD, torch.Generator(device=device).manual_seed(0), 32,
                          channels_last=True)
    assert torch.equal(out, again)                       # seeded: the same batch twice


@pytest.mark.parametrize("device", DEVICES)
def test_inner_loop_on_the_device_equals_plain_adam_on_the_cpu(device):
    support, targets, query = episodes(4, seed=2)
    torch.manual_seed(0)
    initial = semantic_regressor(FEATURES, DIM)
    weights, biases = fit_regressors(initial.weight.to(device), initial.bias.to(device), support.to(device),
                                     targets.to(device), CONFIG)
    out = apply_regressors(weights, biases, query.to(device))
    assert out.device.type == device
    for b in range(4):
        plain = copy.deepcopy(initial)
        plain_fit_regressor(plain, support[b], targets[b], CONFIG)
        torch.testing.assert_close(weights[b].cpu(), plain.weight.detach(), rtol=0, atol=5e-4)
        with torch.no_grad():
            torch.testing.assert_close(out[b].cpu(), plain(query[b]), rtol=0, atol=5e-3)
    # both modes through the public entry point; reset leaves the regressor alone, carry moves it
    regressor = copy.deepcopy(initial).to(device)
    reset = semantic_queries(regressor, support.to(device), targets.to(device), query.to(device), CONFIG, "reset")
    torch.testing.assert_close(reset, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(regressor.weight.cpu(), initial.weight, rtol=0, atol=0)
    carried = semantic_queries(regressor, support.to(device), targets.to(device), query.to(device), CONFIG, "carry")
    torch.testing.assert_close(carried[0], out[0], rtol=0, atol=1e-5)        # the first episode starts the same
    assert (regressor.weight.cpu() - initial.weight).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_on_the_device_finds_the_planted_partition(device):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 5, 1, 8, generator=g) * 10
    points = (centres + 0.5 * torch.randn(4, 5, 12, 8, generator=g)).reshape(4, 60, 8)
    planted = torch.arange(5).repeat_interleave(12)
    ours = batched_kmeans(points.to(device), 5, seed=0)
    assert ours.labels.device.type == device
    for b in range(4):
        # the planted partition (labels may be permuted): same-cluster pairs agree
        same = ours.labels[b].cpu().unsqueeze(0) == ours.labels[b].cpu().unsqueeze(1)
        assert torch.equal(same, planted.unsqueeze(0) == planted.unsqueeze(1))
    expected_inertia = torch.stack([sum(((points[b][planted == k] - points[b][planted == k].mean(0)) ** 2).sum()
                                        for k in range(5)) for b in range(4)])
    torch.testing.assert_close(ours.inertia.cpu(), expected_inertia, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["fusion", "concat"])
@pytest.mark.parametrize("transductive", [False, True])
def test_heads_on_the_device_equal_float64_on_the_cpu(device, head, transductive):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = TasNet(FEATURES, DIM, HeadConfig(head=head, metric="euclidean", lamda=0.3))
    way, shot, queries = 5, 2, 6
    inputs = (torch.randn(3, way * shot, FEATURES, generator=g), torch.randn(3, way * queries, FEATURES, generator=g),
              torch.randn(3, way, DIM, generator=g), torch.randn(3, way * queries, DIM, generator=g))
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(*(t.double() for t in inputs), shot, transductive)
        ours = copy.deepcopy(model).to(device)(*(t.to(device) for t in inputs), shot, transductive)
    assert ours.device.type == device and ours.dtype == torch.float32 and ours.shape == (3, way * queries, way)
    torch.testing.assert_close(ours.cpu().double(), expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(ours.argmax(-1).cpu(), expected.argmax(-1))
