"""The batched augmentation equals torchvision's arithmetic and draws its parameters from the same distributions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from dataloader.batch_augment import (_resample_taps, _resample_weights, _resized_crop, color_jitter_, eval_transform,
                                      resized_crop, sample_crop_boxes, torchvision_eval_transform,
                                      torchvision_train_transform, train_augment)
from synthetic_data import DATA_DIR

MINI_IMAGES = DATA_DIR / "mini-imagenet" / "images"
MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)  # ResNet-12's
STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
STD_T = torch.tensor(STD).view(1, 3, 1, 1)
KS_P = 1e-3


def smooth_images(n: int, height: int = 84, width: int = 84, seed: int = 0) -> torch.Tensor:
    """(n, H, W, 3) uint8: coarse noise upsampled, so that resampling behaves as on photographs."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    fine = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def real_images(n: int) -> torch.Tensor | None:
    """(n, 84, 84, 3) uint8 miniImageNet photographs spread over the classes, or None when absent."""
    if not MINI_IMAGES.is_dir():
        return None
    files = sorted(MINI_IMAGES.glob("*.jpg"))
    files = files[:: max(1, len(files) // n)][:n]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


def photo_like(n: int) -> torch.Tensor:
    images = real_images(n)
    return smooth_images(n) if images is None else images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.numpy()) for image in images]


def test_outputs_have_the_asked_size_and_memory_format_and_float_input_is_refused():
    images = smooth_images(5, 84, 84)
    out = train_augment(images, MEAN, STD, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 84, 84) and out.dtype == torch.float32 and out.device == images.device
    assert out.is_contiguous() and torch.isfinite(out).all()
    out = train_augment(images, MEAN, STD, out_size=64, channels_last=True)  # global generator
    assert out.shape == (5, 3, 64, 64) and out.is_contiguous(memory_format=torch.channels_last)
    out = eval_transform(smooth_images(3, 32, 32), MEAN, STD, channels_last=True)
    assert out.shape == (3, 3, 84, 84) and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(images.float(), MEAN, STD)


def test_seeded_generator_makes_runs_reproducible():
    images = smooth_images(16)
    first = train_augment(images, MEAN, STD, torch.Generator().manual_seed(3))
    again = train_augment(images, MEAN, STD, torch.Generator().manual_seed(3))
    other = train_augment(images, MEAN, STD, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_without_randomness_the_output_is_the_normalised_input_exactly():
    images = smooth_images(8)
    out = train_augment(images, MEAN, STD, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                        jitter=0.0, flip_p=0.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.equal(out, (images.permute(0, 3, 1, 2).float() / 255 - mean) / STD_T)


def assert_matches_torchvision(pixels: torch.Tensor, images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor):
    """pixels (B, 3, S, S) against `F.resized_crop(antialias=True)` (+ hflip) per image."""
    out_size = pixels.shape[-1]
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(images[b].permute(2, 0, 1).float() / 255, top, left, h, w, [out_size, out_size],
                              antialias=True)
        ref = TF.hflip(ref) if flip[b] else ref
        assert (pixels[b] - ref).abs().max() < 2e-5


@pytest.mark.parametrize("height,width,out_size", [(84, 84, 84), (120, 100, 84), (84, 84, 40)])
def test_resized_crop_equals_torchvision_tensor_path(height, width, out_size):
    """Upscaling and antialiased downscaling both match `F.resized_crop(antialias=True)`; flips too."""
    images = smooth_images(24, height, width)
    boxes = sample_crop_boxes(24, height, width, generator=torch.Generator().manual_seed(0))
    boxes[0] = torch.tensor([0, 0, height, width])
    flip = torch.arange(24) % 2 == 0
    assert_matches_torchvision(resized_crop(images, boxes, out_size, flip), images, boxes, flip)


def test_color_jitter_equals_torchvision_functional():
    pixels = smooth_images(12).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(0)
    factors = 0.6 + 0.8 * torch.rand(12, 3, generator=g)
    order = torch.rand(12, 3, generator=g).argsort(dim=1)
    mine = color_jitter_(pixels.clone(), factors, order)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for b in range(12):
        ref = pixels[b]
        for op in order[b].tolist():
            ref = adjust[op](ref, float(factors[b, op]))
        assert (mine[b] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("height,width", [(84, 84), (32, 32), (100, 120)])
def test_eval_transform_equals_torchvision_tensor_path(height, width):
    images = smooth_images(4, height, width)
    plain = transforms.Compose([transforms.Resize(92, antialias=True), transforms.CenterCrop(84),
                                transforms.Normalize(MEAN, STD)])
    ref = torch.stack([plain(image.permute(2, 0, 1).float() / 255) for image in images])
    assert (eval_transform(images, MEAN, STD) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("source", ["smooth", "real"])
def test_eval_transform_matches_torchvision_pil_path(source):
    images = smooth_images(32) if source == "smooth" else real_images(32)
    if images is None:
        pytest.skip(f"{MINI_IMAGES} is absent (set TASNET_DATA)")
    plain = torchvision_eval_transform(MEAN, STD)
    ref = torch.stack([plain(image) for image in to_pil(images)])
    # in grey levels of the [0, 1] image: PIL rounds to uint8 after each resize pass, we stay in float
    diff = ((eval_transform(images, MEAN, STD) - ref) * STD_T).abs() * 255
    print(f"eval vs PIL ({source}): mean |diff| {diff.mean():.3f}/255, max {diff.max():.3f}/255")
    assert diff.mean() < 0.5 and diff.max() <= 1.5


def box_statistics(boxes: torch.Tensor, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.double().unbind(1)
    return {"area": (h * w / (height * width)).numpy(), "aspect": (w / h).numpy(),
            "top": (top / height).numpy(), "left": (left / width).numpy()}


@pytest.mark.parametrize("height,width,scale", [(84, 84, (0.08, 1.0)), (40, 100, (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_distribution(height, width, scale):
    n, ratio = 4000, (3 / 4, 4 / 3)
    mine = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(1))
    with torch.random.fork_rng():
        torch.manual_seed(2)
        image = torch.empty(3, height, width)
        ref = torch.tensor([transforms.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])
    mine_stats, ref_stats = box_statistics(mine, height, width), box_statistics(ref, height, width)
    for name in mine_stats:
        assert ks_2samp(mine_stats[name], ref_stats[name]).pvalue > KS_P, name


def test_crop_fallback_is_torchvision_central_crop():
    # no candidate of area 1 with aspect ratio in [2, 3] fits a square: torchvision's fallback crop
    with torch.random.fork_rng():
        ref = transforms.RandomResizedCrop.get_params(torch.empty(3, 84, 84), (1.0, 1.0), (2.0, 3.0))
    mine = sample_crop_boxes(10, 84, 84, (1.0, 1.0), (2.0, 3.0))
    assert ref == (21, 0, 42, 84) and (mine == torch.tensor(ref)).all()


def test_flip_rate_is_one_half():
    images = torch.zeros(4000, 8, 8, 3, dtype=torch.uint8)
    images[:, :, 4:] = 255  # bright right half: a flip puts it on the left
    out = train_augment(images, (0.0,) * 3, (1.0,) * 3, torch.Generator().manual_seed(0), out_size=8,
                        scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert 0.47 < flipped.float().mean() < 0.53


def image_statistics(pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image brightness, contrast, colourfulness and sharpness of (B, 3, H, W) images in [0, 1]."""
    grey = pixels.mean(dim=1)
    return {"mean": pixels.mean(dim=(1, 2, 3)).numpy(), "std": pixels.std(dim=(1, 2, 3)).numpy(),
            "chroma": (pixels - grey[:, None]).abs().mean(dim=(1, 2, 3)).numpy(),
            "gradient": (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2)).numpy()}


@pytest.mark.parametrize("full_pipeline", [False, True])
@pytest.mark.slow
def test_augmented_statistics_match_torchvision_pil_path(full_pipeline):
    """Same inputs, many draws: the output statistics follow the distributions of torchvision's PIL path.

    Each statistic is divided by that of the un-augmented source image, which removes the spread between
    images and leaves the spread of the augmentation (this detects jitter 0.3 instead of 0.4, or a crop
    scale of (0.2, 1) instead of (0.08, 1), at p < 0.001).
    """
    sources = photo_like(16)
    images = sources.repeat(40, 1, 1, 1)
    source_stats = image_statistics(images.permute(0, 3, 1, 2).float() / 255)
    identity = (0.0,) * 3, (1.0,) * 3  # Normalize with mean 0 and std 1 leaves [0, 1] pixels to compare
    if full_pipeline:
        plain = torchvision_train_transform(*identity)
        mine = train_augment(images, *identity, torch.Generator().manual_seed(0))
    else:
        plain = transforms.Compose([transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor()])
        mine = train_augment(images, *identity, torch.Generator().manual_seed(0), scale=(1.0, 1.0),
                             ratio=(1.0, 1.0))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ref = torch.stack([plain(image) for image in to_pil(images)])
    mine_stats, ref_stats = image_statistics(mine), image_statistics(ref)
    for name in mine_stats:
        relative_mine, relative_ref = mine_stats[name] / source_stats[name], ref_stats[name] / source_stats[name]
        assert ks_2samp(relative_mine, relative_ref).pvalue > KS_P, name


def edge_boxes(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(n, 4) random boxes, the first ones pinned to the borders: whole image, 1-pixel and 1-row/column crops
    in the corners, boxes touching the bottom-right edge."""
    boxes = sample_crop_boxes(n, height, width, generator=torch.Generator().manual_seed(seed))
    pinned = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 1, height, 1),
              (height - 1, 0, 1, width), (height - 5, width - 7, 5, 7), (0, 3, 2, width - 3)]
    boxes[:len(pinned)] = torch.tensor(pinned)
    return boxes


def dense_matrix(index: torch.Tensor, lam: torch.Tensor, in_size: int) -> torch.Tensor:
    """(..., 2, out) taps and (..., out) weights -> (..., out, in) resampling matrix."""
    weights = torch.stack([1 - lam, lam], dim=-1)                                                # (..., out, 2)
    matrix = torch.zeros(*lam.shape, in_size, dtype=torch.float64)
    return matrix.scatter_add_(-1, index.transpose(-1, -2), weights.double())


@pytest.mark.parametrize("in_size,out_size,offset", [(84, 84, 0), (60, 84, 0), (84, 92, 4), (32, 92, 4), (7, 84, 0)])
def test_two_taps_are_the_dense_weights(in_size, out_size, offset):
    """Upscaling: the sparse taps, scattered into a matrix, are `_resample_weights` (borders and flips included)."""
    starts = torch.tensor([0, 0, in_size - 1, 0, 3, in_size // 2], dtype=torch.float32)
    lengths = torch.tensor([in_size, 1, 1, in_size - 1, max(1, in_size - 5), in_size - in_size // 2],
                           dtype=torch.float32)
    resized = out_size + 2 * offset
    flip = torch.arange(len(starts)) % 2 == 1
    index, lam = _resample_taps(starts, lengths, resized, out_size, offset=offset, flip=flip)
    assert (index >= starts[:, None, None]).all() and (index < (starts + lengths)[:, None, None]).all()
    assert ((lam >= 0) & (lam < 1)).all()
    dense = _resample_weights(starts, lengths, in_size, resized, out_size, offset=offset)
    dense = torch.where(flip[:, None, None], dense.flip(1), dense)
    assert (dense_matrix(index, lam, in_size) - dense).abs().max() < 1e-6


@pytest.mark.parametrize("height,width,out_size", [(84, 84, 84), (60, 84, 84), (84, 50, 84), (20, 33, 40)])
def test_sparse_resized_crop_equals_dense_path_and_torchvision(height, width, out_size):
    """Every crop of an image no larger than the output is upscaled: both paths and torchvision agree."""
    images = smooth_images(32, height, width)
    boxes = edge_boxes(32, height, width)
    flip = torch.arange(32) % 3 == 0
    sparse = torch.empty(32, 3, out_size, out_size)
    dense = torch.empty_like(sparse)
    _resized_crop(images, boxes, flip, sparse, sparse=True)
    _resized_crop(images, boxes, flip, dense, sparse=False)
    assert (sparse - dense).abs().max() < 1e-5
    assert torch.equal(resized_crop(images, boxes, out_size, flip), sparse)  # the sparse path is the one taken
    assert_matches_torchvision(sparse, images, boxes, flip)
    if (height, width) == (out_size, out_size):  # the whole image at its own size is the (mirrored) input, exactly
        assert flip[0] and torch.equal(sparse[0], (images[0].permute(2, 0, 1).float() / 255).flip(-1))


@pytest.mark.parametrize("height,width,out_size", [(120, 100, 84), (84, 84, 40), (90, 70, 84)])
def test_downscaling_crops_take_the_dense_path(height, width, out_size):
    """Images larger than the output along either axis may be downscaled (the two taps would be wrong there):
    the dense path is taken, and matches torchvision."""
    images = smooth_images(12, height, width)
    boxes = edge_boxes(12, height, width)
    flip = torch.arange(12) % 2 == 0
    dense = torch.empty(12, 3, out_size, out_size)
    _resized_crop(images, boxes, flip, dense, sparse=False)
    assert torch.equal(resized_crop(images, boxes, out_size, flip), dense)
    assert_matches_torchvision(dense, images, boxes, flip)


@pytest.mark.slow
def test_chunks_and_reused_buffers_do_not_change_results(monkeypatch):
    """On a CPU the batch goes in parts through reused buffers: the results equal one pass over the whole batch,
    whatever ran before, and returned tensors never share the reused memory."""
    images = smooth_images(37)
    monkeypatch.setattr("dataloader.batch_augment._CPU_CHUNK", 1000)
    whole = train_augment(images, MEAN, STD, torch.Generator().manual_seed(5))
    crops = resized_crop(images[:9], sample_crop_boxes(9, 84, 84, generator=torch.Generator().manual_seed(1)))
    kept = crops.clone()
    monkeypatch.setattr("dataloader.batch_augment._CPU_CHUNK", 8)
    parts = train_augment(images, MEAN, STD, torch.Generator().manual_seed(5))
    train_augment(smooth_images(3, 40, 40), MEAN, STD, out_size=64)  # other shapes in the same buffers
    again = train_augment(images, MEAN, STD, torch.Generator().manual_seed(5))
    assert torch.equal(parts, whole) and torch.equal(again, whole) and torch.equal(crops, kept)


@pytest.mark.parametrize("first_mode", ["inference", "grad"])
def test_reused_buffers_work_across_inference_mode(first_mode):
    """Pretraining validates (eval_transform under inference_mode) between training epochs (train_augment
    outside it): the CPU's reused buffers must serve both, whichever comes first."""
    images = smooth_images(4)
    calls = [lambda: eval_transform(images, MEAN, STD), lambda: train_augment(images, MEAN, STD)]
    with torch.inference_mode(first_mode == "inference"):
        expected = eval_transform(images, MEAN, STD)
    for call in calls:
        with torch.inference_mode(first_mode != "inference"):
            call()
        with torch.inference_mode(first_mode == "inference"):
            call()
        call()
    assert torch.equal(eval_transform(images, MEAN, STD), expected)
