"""Batched pretraining transforms on uint8 image tensors, on any device: the fast path of A4's transforms.

The plain path runs torchvision per image on PIL images (`torchvision_train_transform`,
`torchvision_eval_transform`). The batched path draws the same random parameters with the same distributions
and does the same arithmetic as torchvision's tensor path, for a whole batch at once:

* Crop + resize is one separable linear map per sample, `rows @ image @ cols^T`, whose matrices hold the
  antialiased-bilinear weights of PIL and of `interpolate(antialias=True)` (a triangle filter widened by the
  downscale factor). Upscaling (every crop of an 84x84 image resized to 84) and antialiased downscaling both
  match `F.resized_crop(antialias=True)` to 1e-5; the horizontal flip is folded into the column matrix.
* ColorJitter blends with black (brightness), the mean grey level (contrast) or the grey image (saturation),
  clamped to [0, 1] after each step, in a random order per sample, as torchvision's tensor path.

Deviations from the PIL path, which rounds to uint8 after each resize pass and each colour step (and uses
integer luma weights): this path stays in float32, so eval outputs differ from PIL's by 0.26-0.29 grey levels
on average, < 1 at most; train outputs follow the same distributions (tested). With TF32 matmuls enabled on
CUDA the resampling weights lose precision to about 0.1 grey level; autocast is switched off inside.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
_LUMA = (0.2989, 0.587, 0.114)


def torchvision_train_transform(mean: Sequence[float], std: Sequence[float], out_size: int = 84):
    """The plain per-image train pipeline of A4 (PIL image in, normalised (3, out_size, out_size) float out)."""
    from torchvision import transforms  # imported here: it costs ~2 s at start-up and only this path needs it

    return transforms.Compose([
        transforms.RandomResizedCrop(out_size),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def torchvision_eval_transform(mean: Sequence[float], std: Sequence[float], out_size: int = 84, resize: int = 92):
    """The plain per-image eval pipeline of A4 (PIL image in, normalised (3, out_size, out_size) float out)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(out_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def sample_crop_boxes(batch_size: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """`RandomResizedCrop.get_params` for a batch.

    Returns:
        (B, 4) int64 boxes (top, left, height, width) in pixels.
    """
    area = height * width
    # torchvision tries up to 10 (area, ratio) candidates and keeps the first that fits in the image; drawing
    # all 10 at once and picking the first valid one gives the same distribution. float64 mirrors its Python floats.
    u = torch.rand(batch_size, 2, 10, generator=generator, device=device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    # torch.round and Python's round both round half to even
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    crop_w, crop_h = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0]

    # torchvision's fallback when no candidate fits: the central crop, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    found = valid.any(dim=1)
    crop_w = torch.where(found, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(found, crop_h, torch.full_like(crop_h, fallback_h))

    # floor(u * n) is uniform on {0, ..., n - 1}, as torch.randint(0, n); the clamp guards u * n rounding up to n
    u_pos = torch.rand(batch_size, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.minimum(torch.floor(u_pos[:, 0] * (height - crop_h + 1)), height - crop_h)
    left = torch.minimum(torch.floor(u_pos[:, 1] * (width - crop_w + 1)), width - crop_w)
    top = torch.where(found, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, resized_len: int | torch.Tensor,
                      out_size: int, offset: int = 0) -> torch.Tensor:
    """One axis of a crop + antialiased bilinear resize (+ crop), as a matrix.

    The window [start, start + length) of an axis of `in_size` pixels is resized to `resized_len` pixels, of
    which pixels offset .. offset + out_size - 1 are kept. The weights are those of PIL's and torch's
    antialiased resampling: a triangle filter, widened by the scale factor when downscaling, normalised over
    the pixels inside the window (which is also how both treat the borders).

    Args:
        start, length: (B,) float window per sample.
    Returns:
        (B, out_size, in_size) float32; each row sums to 1.
    """
    device = start.device
    start, length = start.float(), length.float()                   # whole pixels: exact in float32
    scale = length / resized_len                                    # window pixels per output pixel, (B,)
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=device) + offset + 0.5) * scale[:, None]            # (B, out)
    pixel = torch.arange(in_size, device=device) - start[:, None]                               # (B, in)
    # in-place from here on: on a CPU, allocating fresh (B, out, in) buffers costs more than the arithmetic
    weights = (pixel[:, None, :] + 0.5) - centre[:, :, None]                                     # (B, out, in)
    weights.div_(support[:, None, None]).abs_().neg_().add_(1.0).clamp_(min=0.0)
    weights.masked_fill_(((pixel < 0) | (pixel >= length[:, None]))[:, None, :], 0.0)
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8, rows (B, Ho, H), cols (B, Wo, W) -> (B, 3, Ho, Wo) contiguous float32 in [0, 1].

    Two plain bmm calls: the first reads the HWC input as it is, one transpose between them puts the channels
    first, so the second writes NCHW directly.
    """
    batch, height, width, _ = images.shape
    pixels = images.to(torch.float32).view(batch, height, width * 3)
    pixels = torch.bmm(rows, pixels).view(batch, -1, width, 3).permute(0, 3, 1, 2).reshape(batch, -1, width)
    pixels = torch.bmm(pixels, cols.transpose(1, 2)).view(batch, 3, rows.shape[1], cols.shape[1])
    # weights of 0 and 1 reproduce the input exactly, so dividing by 255 afterwards keeps identity crops exact
    return pixels.div_(255)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, out_size: int = 84,
                 flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image to its box, resize to out_size x out_size (bilinear, antialiased), optionally mirror.

    Args:
        images: (B, H, W, 3) uint8.
        boxes: (B, 4) int (top, left, height, width), as from `sample_crop_boxes`.
        flip: (B,) bool, mirror left-right where True.
    Returns:
        (B, 3, out_size, out_size) float32 in [0, 1].
    """
    _, height, width, _ = images.shape
    boxes = boxes.to(images.device, torch.float32)
    rows = _resample_weights(boxes[:, 0], boxes[:, 2], height, out_size, out_size)
    cols = _resample_weights(boxes[:, 1], boxes[:, 3], width, out_size, out_size)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return _resample(images, rows, cols)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness / contrast / saturation adjustments, per sample, in a per-sample order.

    Args:
        images: (B, 3, H, W) float in [0, 1].
        factors: (B, 3) brightness, contrast and saturation factors.
        order: (B, 3) int64, each row a permutation of (0, 1, 2) = (brightness, contrast, saturation).
    Returns:
        (B, 3, H, W) float in [0, 1], a new tensor.
    """
    return _color_jitter_(images.clone(), factors, order)


def _color_jitter_(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`color_jitter` in place."""
    for step in range(3):
        op = order[:, step].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, step:step + 1]).view(-1, 1, 1, 1)
        grey = images[:, 0:1] * _LUMA[0]                                                 # (B, 1, H, W)
        grey.add_(images[:, 1:2], alpha=_LUMA[1]).add_(images[:, 2:3], alpha=_LUMA[2])
        # every adjustment is a blend with a target: black, the mean grey level, or the grey image;
        # masking by multiplying with 0 / 1 and adding 0 keeps the chosen values exact
        flat_target = torch.where(op == 1, grey.mean(dim=(2, 3), keepdim=True), 0.0)
        target = grey.mul_((op == 2).to(grey.dtype)).add_(flat_target)
        # lerp_ is factor * images + (1 - factor) * target in one pass, without a new buffer
        images.lerp_(target, 1.0 - factor).clamp_(0.0, 1.0)
    return images


def _normalise(images: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    # per channel with Python floats: a (3,) tensor built here would be a blocking host-to-device copy per batch.
    # Subtracting then dividing by the float32 value is exactly what Normalize computes.
    mean = torch.as_tensor(mean, dtype=torch.float32).tolist()
    std = torch.as_tensor(std, dtype=torch.float32).tolist()
    for channel in range(3):
        images[:, channel].sub_(mean[channel]).div_(std[channel])
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (B, H, W, 3) image batch, got {images.dtype} {tuple(images.shape)}")


def train_augment(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  generator: torch.Generator | None = None, out_size: int = 84, *, scale=(0.08, 1.0),
                  ratio=(3 / 4, 4 / 3), jitter: float = 0.4, flip_p: float = 0.5,
                  channels_last: bool = False) -> torch.Tensor:
    """RandomResizedCrop + ColorJitter(jitter, jitter, jitter) + RandomHorizontalFlip + ToTensor + Normalize.

    Args:
        images: (B, H, W, 3) uint8 RGB on any device.
        mean, std: 3 floats each, the backbone's normalisation.
        generator: the source of all randomness, on the images' device (default: torch's global one).
        channels_last: return the batch in channels_last memory format.
    Returns:
        (B, 3, out_size, out_size) float32, normalised.
    """
    _check_images(images)
    batch, height, width, _ = images.shape
    device = images.device
    # the matmuls must stay float32 even inside a caller's autocast region: bf16 would blur the pixel values
    with torch.autocast(device.type, enabled=False):
        boxes = sample_crop_boxes(batch, height, width, scale, ratio, generator, device)
        flip = torch.rand(batch, generator=generator, device=device) < flip_p
        pixels = resized_crop(images, boxes, out_size, flip)
        if jitter > 0:
            low = max(0.0, 1.0 - jitter)
            factors = low + (1.0 + jitter - low) * torch.rand(batch, 3, generator=generator, device=device)
            # argsort of uniform keys is a uniformly random permutation, like torchvision's randperm per call
            order = torch.rand(batch, 3, generator=generator, device=device).argsort(dim=1)
            pixels = _color_jitter_(pixels, factors, order)
        return _normalise(pixels, mean, std, channels_last)


def eval_transform(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], out_size: int = 84,
                   resize: int = 92, *, channels_last: bool = False) -> torch.Tensor:
    """Resize(resize) (shorter side; bilinear, antialiased) + CenterCrop(out_size) + ToTensor + Normalize.

    Args:
        images: (B, H, W, 3) uint8 RGB on any device.
    Returns:
        (B, 3, out_size, out_size) float32, normalised.
    """
    _check_images(images)
    if resize < out_size:
        raise ValueError(f"resize ({resize}) must be at least out_size ({out_size}): CenterCrop would pad")
    batch, height, width, _ = images.shape
    # torchvision's rule: the shorter side becomes `resize`, the longer one is scaled and truncated
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top, left = int(round((new_h - out_size) / 2.0)), int(round((new_w - out_size) / 2.0))
    zero = torch.zeros(1, device=images.device)
    with torch.autocast(images.device.type, enabled=False):
        rows = _resample_weights(zero, zero + height, height, new_h, out_size, offset=top)
        cols = _resample_weights(zero, zero + width, width, new_w, out_size, offset=left)
        # bmm is slow on stride-0 (expanded) batches, so the shared matrices are copied per sample
        rows, cols = rows.expand(batch, -1, -1).contiguous(), cols.expand(batch, -1, -1).contiguous()
        pixels = _resample(images, rows, cols)
        return _normalise(pixels, mean, std, channels_last)
