"""Batched pretraining transforms on uint8 image tensors, on any device: a fast twin of the per-image torchvision path.

The plain path runs torchvision per image on PIL images (`torchvision_train_transform`,
`torchvision_eval_transform`). The batched path draws the same random parameters from the same distributions
and does the arithmetic of torchvision's tensor path, for a whole batch at once:

* Crop + resize is one separable linear map per sample, `rows @ image @ cols^T`, whose matrices hold the
  antialiased-bilinear weights of PIL and of `interpolate(antialias=True)` (a triangle filter widened by the
  downscale factor); the horizontal flip is folded into the column weights. Upscaling and antialiased
  downscaling both match `F.resized_crop(antialias=True)` to 1e-5. When no crop can be downscaled (the image is
  no larger than the output: known from shapes, no device sync) an output pixel has only two non-zero weights
  per axis, so each axis is an index_select or gather and a lerp (`_resample_taps`), 2-3x faster than the bmm's.
* ColorJitter blends with black (brightness), the mean grey level (contrast) or the grey image (saturation),
  clamped to [0, 1] after each step, in a random order per sample, as torchvision's tensor path.

On a CPU a batch goes in parts of 16 images that stay in cache, through buffers reused across calls (`_Scratch`).
bench/pretrain.py measures the speed-up.

Deviations from the PIL path, which rounds to uint8 after each resize pass and each colour step (and uses
integer luma weights): this path stays in float32, so eval outputs differ from PIL's by 0.26-0.29 grey levels
on average, < 1 at most; train outputs follow the same distributions (tested). With TF32 matmuls enabled on
CUDA the dense path's resampling weights lose precision to about 0.1 grey level (the two-tap path does no
matmul); autocast is switched off inside.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import torch

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
_LUMA = (0.2989, 0.587, 0.114)
# images per part of a batch on a CPU (see `_chunks`)
_CPU_CHUNK = 16


class _Scratch(threading.local):
    """Intermediate buffers of the CPU path, kept from call to call (one set per thread).

    Freed after every call, glibc returns blocks this large (~8 MB per part) to the OS, and the next call pays a
    page fault per 4 KiB (2-3 us on a virtual machine), more than the arithmetic. On a GPU the caching allocator
    already recycles memory.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor; on a CPU it shares memory with earlier requests of `name`."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        size = math.prod(shape)
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < size:
            # a normal tensor even when first asked for under inference_mode (feature extraction, validation):
            # an inference tensor could not be written to afterwards, in the next training batch
            with torch.inference_mode(False):
                buffer = self.buffers[name, dtype] = torch.empty(size, dtype=dtype)
        return buffer[:size].view(shape)


_scratch = _Scratch()


def torchvision_train_transform(mean: Sequence[float], std: Sequence[float], out_size: int = 84):
    """The plain per-image train pipeline (PIL image in, normalised (3, out_size, out_size) float out)."""
    from torchvision import transforms  # imported here: it costs ~2 s at start-up and only this path needs it

    return transforms.Compose([
        transforms.RandomResizedCrop(out_size),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def torchvision_eval_transform(mean: Sequence[float], std: Sequence[float], out_size: int = 84, resize: int = 92):
    """The plain per-image eval pipeline (PIL image in, normalised (3, out_size, out_size) float out)."""
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


def _resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8, rows (B, Ho, H), cols (B, Wo, W) -> out: (B, 3, Ho, Wo) contiguous float32 in [0, 1].

    Two plain bmm calls: the first reads the HWC input as it is, one transpose between them puts the channels
    first, so the second writes NCHW directly.
    """
    batch, height, width, _ = images.shape
    pixels = images.to(torch.float32).view(batch, height, width * 3)
    pixels = torch.bmm(rows, pixels).view(batch, -1, width, 3).permute(0, 3, 1, 2).reshape(batch, -1, width)
    torch.bmm(pixels, cols.transpose(1, 2), out=out.view(batch, -1, cols.shape[1]))
    # weights of 0 and 1 reproduce the input exactly, so dividing by 255 afterwards keeps identity crops exact
    return out.div_(255)


def _resample_taps(start: torch.Tensor, length: torch.Tensor, resized_len: int | torch.Tensor, out_size: int,
                   offset: int = 0, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_resample_weights` of an upscaling axis (length <= resized_len) as two taps per output pixel.

    Without downscaling the triangle filter keeps its width of one pixel, so an output pixel at window
    coordinate `pos` (pixel centres at 0, 1, ...) blends pixels floor(pos) and floor(pos) + 1 by the fraction of
    pos. Dropping the tap outside the window and renormalising, as `_resample_weights` does at the borders, is
    the same as clamping pos at 0 on the left, and on the right (pos > length - 1) pointing both taps at the
    last pixel.

    Args:
        start, length: (...,) float window per axis (any leading shape).
        flip: (...,) bool, mirror the output positions where True.
    Returns:
        index: (..., 2, out_size) int64 pixel indices of the two taps (equal at the window's right end).
        lam: (..., out_size) float32 in [0, 1), the weight of the second tap.
    """
    start, length = start.float(), length.float()
    position = torch.arange(out_size, device=start.device, dtype=torch.float32)
    if flip is not None:
        position = torch.where(flip[..., None], (out_size - 1) - position, position)
    position = ((position + (offset + 0.5)) * (length / resized_len)[..., None]).sub_(0.5).clamp_(min=0.0)
    low = position.floor()
    lam = position.sub_(low)
    high = torch.minimum(low + 1, (length - 1)[..., None])
    index = torch.stack([low, high], dim=-2).add_(start[..., None, None]).long()
    return index, lam


def _resample_sparse(images: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                     cols: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 and the `_resample_taps` of each axis -> out: (B, 3, Ho, Wo) contiguous float32 in [0, 1].

    Rows first: an image row is contiguous, so picking the two source rows of every output row is one
    index_select of uint8 rows, and a lerp blends them. The column taps are then gathered from the channels-first
    copy of that, each tap into its own contiguous plane, so that the last lerp reads and writes contiguous memory
    and writes NCHW. Indices and weights may have a leading dim of 1 (shared by the batch).
    """
    batch, height, width, _ = images.shape
    device = images.device
    (row_index, row_lam), (col_index, col_lam) = rows, cols
    out_h, out_w = row_lam.shape[-1], col_lam.shape[-1]
    flat = (row_index + torch.arange(batch, device=device)[:, None, None] * height).view(-1)        # (B * 2 * Ho)
    picked = _scratch("rows_uint8", (len(flat), width * 3), torch.uint8, device)
    torch.index_select(images.reshape(batch * height, width * 3), 0, flat, out=picked)
    taps = _scratch("taps", (batch, 2, out_h, width * 3), torch.float32, device).copy_(picked.view(batch, 2, out_h, -1))
    blended = _scratch("blended", (batch, out_h, width * 3), torch.float32, device)
    torch.lerp(taps[:, 0], taps[:, 1], row_lam[..., None], out=blended)
    planar = _scratch("planar", (batch, 3, out_h, width), torch.float32, device)
    planar.copy_(blended.view(batch, out_h, width, 3).permute(0, 3, 1, 2))
    index = col_index.view(-1, 1, 2, 1, out_w).expand(batch, 3, 2, out_h, out_w)
    taps = _scratch("taps", (batch, 3, 2, out_h, out_w), torch.float32, device)  # the row taps are spent
    torch.gather(planar.unsqueeze(2).expand(batch, 3, 2, out_h, width), 4, index, out=taps)
    # a weight of 0 reproduces the first tap exactly, so identity crops stay exact
    return torch.lerp(taps[:, :, 0], taps[:, :, 1], col_lam.view(-1, 1, 1, out_w), out=out).div_(255)


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
    out = torch.empty(len(images), 3, out_size, out_size, device=images.device)
    for part in _chunks(len(images), images.device):
        _resized_crop(images[part], boxes[part], None if flip is None else flip[part], out[part])
    return out


def _resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None, out: torch.Tensor,
                  sparse: bool | None = None) -> torch.Tensor:
    """`resized_crop` into out, (B, 3, S, S) contiguous: by two taps per pixel and axis (`sparse`) when every
    crop is upscaled, by weight matrices otherwise (or as `sparse` says; True needs boxes no larger than S x S)."""
    _, height, width, _ = images.shape
    out_size = out.shape[-1]
    boxes = boxes.to(images.device, torch.float32)
    if sparse is None:
        # a box lies inside its image, so with the image no larger than the output every crop is upscaled
        sparse = height <= out_size and width <= out_size
    if sparse:
        # rows and columns in one go, as (B, 2) windows, mirrored along the column axis only
        mirror = None if flip is None else torch.stack([torch.zeros_like(flip), flip], dim=1)
        index, lam = _resample_taps(boxes[:, :2], boxes[:, 2:], out_size, out_size, flip=mirror)
        return _resample_sparse(images, (index[:, 0], lam[:, 0]), (index[:, 1], lam[:, 1]), out)
    rows = _resample_weights(boxes[:, 0], boxes[:, 2], height, out_size, out_size)
    cols = _resample_weights(boxes[:, 1], boxes[:, 3], width, out_size, out_size)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return _resample(images, rows, cols, out)


def color_jitter_(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness / contrast / saturation adjustments, per sample, in a per-sample order, in place.

    Args:
        images: (B, 3, H, W) float in [0, 1], overwritten and returned.
        factors: (B, 3) brightness, contrast and saturation factors.
        order: (B, 3) int64, each row a permutation of (0, 1, 2) = (brightness, contrast, saturation).
    """
    # each adjustment blends with a target, factor * image + (1 - factor) * target, where the target is black
    # (brightness), the mean grey level (contrast) or the grey image (saturation): target = a * grey + b * mean
    # with (a, b) = (0, 0), (0, 1 - factor) or (1 - factor, 0). All three steps' coefficients at once, (B, 3, 1, 1):
    factor = factors.gather(1, order).view(-1, 3, 1, 1)
    order = order.view(-1, 3, 1, 1)
    grey_weight, mean_weight = (1.0 - factor) * (order == 2), (1.0 - factor) * (order == 1)
    shape = (len(images), 1, *images.shape[2:])
    for step in range(3):
        a, b, f = (t[:, step:step + 1] for t in (grey_weight, mean_weight, factor))
        grey = torch.mul(images[:, 0:1], _LUMA[0], out=_scratch("grey", shape, images.dtype, images.device))
        grey.add_(images[:, 1:2], alpha=_LUMA[1]).add_(images[:, 2:3], alpha=_LUMA[2])
        # multiplying by 0 and adding 0 leave the other adjustments' values exact. Two in-place ops, not one
        # addcmul: with two broadcast operands the CPU kernel is not vectorised (3x slower)
        offset = grey.mean(dim=(2, 3), keepdim=True).mul_(b)
        target = grey.mul_(a).add_(offset)
        torch.addcmul(target, images, f, out=images).clamp_(0.0, 1.0)
    return images


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
    """(1, 3, 1, 1) float32 mean and std on the device, made once: per batch they would cost a blocking
    host-to-device copy on a GPU, and per channel with Python floats six small ops instead of two on a CPU."""
    with torch.inference_mode(False):  # cached: it must stay a normal tensor whatever mode the first call ran in
        return tuple(torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device) for values in (mean, std))


def _normalise(images: torch.Tensor, mean, std, out: torch.Tensor) -> torch.Tensor:
    """(images - mean) / std per channel, exactly as Normalize, written to `out` (any memory format); (B, 3, H, W)."""
    mean, std = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return torch.sub(images, mean, out=out).div_(std)


def _chunks(batch: int, device: torch.device) -> list[slice]:
    """The parts of a batch to transform in turn: all of it on a GPU, `_CPU_CHUNK` images at a time on a CPU."""
    step = max(1, batch if device.type != "cpu" else _CPU_CHUNK)
    return [slice(start, start + step) for start in range(0, batch, step)]


def _empty_output(batch: int, out_size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    return torch.empty(batch, 3, out_size, out_size, device=device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


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
        if jitter > 0:
            low = max(0.0, 1.0 - jitter)
            factors = low + (1.0 + jitter - low) * torch.rand(batch, 3, generator=generator, device=device)
            # argsort of uniform keys is a uniformly random permutation, like torchvision's randperm per call
            order = torch.rand(batch, 3, generator=generator, device=device).argsort(dim=1)
        out = _empty_output(batch, out_size, device, channels_last)
        for part in _chunks(batch, device):
            chunk = images[part]
            pixels = _scratch("pixels", (len(chunk), 3, out_size, out_size), torch.float32, device)
            _resized_crop(chunk, boxes[part], flip[part], pixels)
            if jitter > 0:
                color_jitter_(pixels, factors[part], order[part])
            _normalise(pixels, mean, std, out[part])
        return out


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
        sparse = height <= new_h and width <= new_w  # upscaling: two taps per pixel, as in `_resized_crop`
        if sparse:
            rows = _resample_taps(zero, zero + height, new_h, out_size, offset=top)
            cols = _resample_taps(zero, zero + width, new_w, out_size, offset=left)
        else:
            rows = _resample_weights(zero, zero + height, height, new_h, out_size, offset=top)
            cols = _resample_weights(zero, zero + width, width, new_w, out_size, offset=left)
        out = _empty_output(batch, out_size, images.device, channels_last)
        for part in _chunks(batch, images.device):
            chunk = images[part]
            pixels = _scratch("pixels", (len(chunk), 3, out_size, out_size), torch.float32, images.device)
            if sparse:
                _resample_sparse(chunk, rows, cols, pixels)
            else:
                # bmm is slow on stride-0 (expanded) batches, so the shared matrices are copied per sample
                expand = (len(chunk), -1, -1)
                _resample(chunk, rows.expand(*expand).contiguous(), cols.expand(*expand).contiguous(), pixels)
            _normalise(pixels, mean, std, out[part])
        return out
