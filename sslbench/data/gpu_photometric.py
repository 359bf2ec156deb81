"""Whole-batch pixel operations with per-sample parameters, for ``sslbench.data.gpu_augment``.

Each function takes a float batch ``(N, 3, H, W)`` in [0, 1] and per-sample parameter tensors of
length N, and reproduces the per-image semantics of ``torchvision.transforms.functional`` on tensors
(crops resampled as PIL/torchvision antialiased resize; jitter, grayscale, blur and solarize as the
tensor functional ops), without a Python loop over samples and without reading tensor values on the
host, so a batch runs asynchronously on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as nnf
from torchvision.transforms import InterpolationMode

# torchvision's ColorJitter op indices (the order its ``get_params`` permutes).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# Factors that leave an image unchanged: the value of a jitter op that is off.
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)


# --- crop and resize ---------------------------------------------------------------------------------


def _filter_weights(distance: Tensor, interpolation: InterpolationMode) -> Tensor:
    """PIL's resampling filters: the triangle (bilinear) and the a = -0.5 cubic (bicubic)."""
    x = distance.abs()
    if interpolation == InterpolationMode.BILINEAR:
        return (1.0 - x).clamp_min(0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(
    start: Tensor, length: Tensor, out_size: int, in_size: int, interpolation: InterpolationMode
) -> Tensor:
    """(N, out_size, in_size) matrices that crop ``[start, start + length)`` of an axis and resize it
    to ``out_size`` as PIL's ``Image.resize`` and torch's antialiased ``interpolate`` do.

    The filter is stretched by the downscale factor (antialiasing), evaluated at pixel centres, cut to
    the crop (the crop's own edge is replicated, never its neighbours read) and normalised per output
    pixel, which is exactly the separable kernel those libraries build.
    """
    if interpolation not in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        raise ValueError(f"batched crops support bilinear and bicubic interpolation, got {interpolation}")
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    scale = length / out_size
    stretch = scale.clamp_min(1.0)
    out = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    pixel = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
    center = (out + 0.5) * scale
    offset = pixel - start
    weights = _filter_weights((offset + 0.5 - center) / stretch, interpolation)
    weights = torch.where((offset >= 0) & (offset < length), weights, torch.zeros_like(weights))
    return weights / weights.sum(dim=-1, keepdim=True)


def crop_resize(
    images: Tensor,
    boxes: Tensor,
    flip: Tensor,
    out_size: int,
    crops_per_image: int,
    interpolation: InterpolationMode,
) -> Tensor:
    """Crop ``boxes`` (N, 4: top, left, height, width) out of ``images`` (B, 3, S, S) and resize each
    to ``out_size`` squared, flipping horizontally where ``flip``; N = crops_per_image * B, crop k of
    image b at row k * B + b. Returns (N, 3, out_size, out_size) clamped to [0, 1] like PIL's output.

    Two batched matrix products (columns, then rows) do the whole batch; the flip is the column
    matrix reversed, which costs nothing and equals flipping after the resize. With TF32 matmuls
    enabled on the GPU the result is good to about 1e-3 instead of float32 rounding.
    """
    batch, channels, height, width = images.shape
    n = crops_per_image
    columns = resample_weights(boxes[:, 1], boxes[:, 3], out_size, width, interpolation)
    columns = torch.where(flip[:, None, None], columns.flip(1), columns)
    rows = resample_weights(boxes[:, 0], boxes[:, 2], out_size, height, interpolation)
    # (B, C*H, W) @ (B, W, n*out): every crop of an image in one product, the image never copied.
    columns = columns.view(n, batch, out_size, width).permute(1, 3, 0, 2).reshape(batch, width, -1)
    narrow = images.reshape(batch, channels * height, width) @ columns
    narrow = narrow.view(batch, channels, height, n, out_size).permute(3, 0, 2, 1, 4)
    narrow = narrow.reshape(n * batch, height, channels * out_size)
    resized = (rows @ narrow).view(n * batch, out_size, channels, out_size).permute(0, 2, 1, 3)
    return resized.clamp(0.0, 1.0).contiguous()


# --- colour ------------------------------------------------------------------------------------------


def luma(images: Tensor) -> Tensor:
    """(N, 1, H, W) ITU-R 601-2 luma with torchvision's coefficients (``rgb_to_grayscale``)."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend`` with a per-sample ratio."""
    ratio = factor[:, None, None, None]
    return (ratio * images + (1.0 - ratio) * other).clamp(0.0, 1.0)


def adjust_hue(images: Tensor, hue_factor: Tensor) -> Tensor:
    """Shift the hue of each sample by its factor in [-0.5, 0.5], through HSV as torchvision does."""
    r, g, b = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = (
        (maxc == r) * (bc - gc)
        + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
        + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    )
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + hue_factor[:, None, None], 1.0)
    # HSV -> RGB without the six-way case split: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6h) mod 6 and n = 5, 3, 1 for r, g, b.
    offsets = 5.0 - 2.0 * torch.arange(3, device=images.device).view(1, 3, 1, 1)  # built on the device
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    value, saturation = maxc.unsqueeze(1), saturation.unsqueeze(1)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def color_jitter(
    images: Tensor, applied: Tensor, factors: Tensor, order: Tensor, hue_enabled: bool = True
) -> Tensor:
    """ColorJitter per sample: ``factors`` (N, 4) brightness, contrast, saturation, hue applied in the
    sample's ``order`` (N, 4 permutation of BRIGHTNESS..HUE), only where ``applied``.

    Brightness, contrast and saturation are one blend towards 0, the grayscale mean or the grayscale
    image, so each slot of the order is a single blend whatever op each sample has there. Hue is
    applied once for the whole batch: the blends a sample does before its hue go in three slots
    before it, those after in three slots after it (an unused slot blends with factor 1: identity).
    """
    is_hue = order == HUE
    hue_position = is_hue.int().argmax(dim=1)
    blends = order.gather(1, torch.argsort(is_hue.int(), dim=1, stable=True)[:, :3])
    slots = torch.arange(3, device=images.device)
    if hue_enabled:
        phases = [slots[None] < hue_position[:, None], slots[None] >= hue_position[:, None]]
    else:
        phases = [torch.ones_like(blends, dtype=torch.bool)]
    out = images
    for phase, active in enumerate(phases):
        if phase == 1:
            out = adjust_hue(out, factors[:, HUE])  # samples without jitter are restored below
        for slot in range(3):
            op = blends[:, slot]
            factor = torch.where(active[:, slot], factors.gather(1, op[:, None])[:, 0], 1.0)
            gray = luma(out)
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            target = (op == CONTRAST).float()[:, None, None, None] * mean
            target = target + (op == SATURATION).float()[:, None, None, None] * gray
            out = _blend(out, target, factor)
    return torch.where(applied[:, None, None, None], out, images)


def grayscale(images: Tensor, applied: Tensor) -> Tensor:
    """``rgb_to_grayscale(num_output_channels=3)`` where ``applied``."""
    return torch.where(applied[:, None, None, None], luma(images).expand_as(images), images)


def gaussian_blur(images: Tensor, applied: Tensor, sigma: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """torchvision's ``gaussian_blur`` (reflect padding) with a per-sample sigma, where ``applied``.

    The 2-D kernel is separable and so is reflect padding, so a horizontal then a vertical depthwise
    convolution equals torchvision's one 2-D convolution.
    """
    n, c, h, w = images.shape
    out = images.reshape(1, n * c, h, w)
    for horizontal, size in ((True, kernel_size[0]), (False, kernel_size[1])):
        half = (size - 1) * 0.5
        x = torch.linspace(-half, half, size, device=images.device)
        pdf = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
        kernel = (pdf / pdf.sum(dim=1, keepdim=True))[:, None].expand(n, c, size)
        pad = [size // 2, size // 2, 0, 0] if horizontal else [0, 0, size // 2, size // 2]
        shape = (n * c, 1, 1, size) if horizontal else (n * c, 1, size, 1)
        out = nnf.conv2d(nnf.pad(out, pad, mode="reflect"), kernel.reshape(shape), groups=n * c)
    return torch.where(applied[:, None, None, None], out.view(n, c, h, w), images)


def solarize(images: Tensor, applied: Tensor, threshold: float) -> Tensor:
    """Invert values >= ``threshold`` (on the [0, 1] scale) where ``applied``."""
    invert = applied[:, None, None, None] & (images >= threshold)
    return torch.where(invert, 1.0 - images, images)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-channel ``(x - mean) / std`` as ``Normalize``."""
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
