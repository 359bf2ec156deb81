"""The papers' view recipes applied to a whole batch on the accelerator, so no CPU workers are needed.

``sslbench.data.augment`` stays the single source of truth: ``BatchViewAugmenter`` is built by reading the
torchvision pipelines that ``build_view_transform`` returns (SimCLR, Chen et al. 2020, arXiv
2002.05709; BYOL, Grill et al. 2020, arXiv 2006.07733; DINO multi-crop, Caron et al. 2021, arXiv
2104.14294, ``DataAugmentationDINO``), and translating every step with its parameters. A recipe
changed there changes here; a step it cannot translate is an error, never silently dropped.

The data loader only decodes and pads (``ImageCanvas``): each image becomes a fixed-size uint8 canvas
plus its valid (h, w), so batches collate without resizing away the aspect ratio. On the device:

- crops are drawn per sample as ``RandomResizedCrop.get_params`` does (10 tries, then the central
  crop), relative to the valid region, and resampled with the pipeline's own filter (bicubic in the
  recipes) with PIL's antialiased separable kernel, as two batched matrix products: the result equals
  torchvision's antialiased tensor ``resized_crop``. PIL also rounds and clips to 8 bits after each
  of its two passes, so the CPU path differs by about 1/255 on smooth images and by up to several
  /255 at single pixels of sharp edges, where the bicubic filter overshoots;
- colour jitter, grayscale, blur and solarize follow ``torchvision.transforms.functional`` on float
  tensors, with per-sample factors and the per-sample random order of ``ColorJitter``. The CPU path
  runs their PIL versions on 8-bit images (rounded after every op, solarize on rounded values),
  which differ from these by about 1/255, and hue, through 8-bit HSV, by up to about 10/255. The
  blur draws the same sigma; PIL approximates the Gaussian by three box passes of the same variance
  and repeats the edge pixels, here it is the exact Gaussian kernel with reflect padding;
- images larger than the canvas are first shrunk to it (``canvas_size_for``: 256 px for 224 px
  views, as the standard ImageNet resize), so a small-scale crop of a large photograph is upsampled
  from fewer source pixels than on the CPU path, which crops the full-resolution image.

All randomness comes from the ``generator`` argument (or the device's global generator), and nothing
reads tensor values on the host, so ``forward`` runs asynchronously on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from torch import Tensor
from torchvision.transforms import InterpolationMode

from sslbench.base.precision import without_autocast
from sslbench.data import gpu_photometric as P
from sslbench.data.augment import (
    MultiViewTransform,
    PILGaussianBlur,
    ToNormalizedTensor,
    ViewRecipe,
    _ToRGB,
    build_view_transform,
)

_CROP_TRIES = 10  # RandomResizedCrop.get_params tries this many boxes before the central fallback


# --- translating a CPU pipeline ----------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """One view's steps and parameters as read from its torchvision pipeline; p = 0 means absent."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: InterpolationMode
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: tuple[float, float] | None = None
    contrast: tuple[float, float] | None = None
    saturation: tuple[float, float] | None = None
    hue: tuple[float, float] | None = None
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: tuple[int, int] = (1, 1)
    blur_sigma: tuple[float, float] = (1.0, 1.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 1.0  # on the [0, 1] scale
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def jitter_ranges(self) -> tuple[tuple[float, float] | None, ...]:
        """(brightness, contrast, saturation, hue) ranges, None where ColorJitter skips the op."""
        return self.brightness, self.contrast, self.saturation, self.hue


# The order the batched pipeline applies steps in; a CPU pipeline in another order is refused.
_STAGES = ("crop", "flip", "color jitter", "grayscale", "blur", "solarize", "normalize")


def _flatten(step: Callable) -> list[Callable]:
    if isinstance(step, T.Compose):
        return [leaf for inner in step.transforms for leaf in _flatten(inner)]
    return [step]


def _translate(step: Callable, p: float, value_range: float) -> tuple[str, dict]:
    """(stage, ViewSpec fields) for one step applied with probability ``p`` to images whose values
    span ``value_range`` (255 for PIL images, 1 after ToTensor)."""
    if isinstance(step, T.RandomApply):
        if len(step.transforms) != 1:
            raise ValueError(f"cannot translate {step!r}: RandomApply must wrap exactly one transform")
        return _translate(step.transforms[0], p * step.p, value_range)
    if isinstance(step, T.RandomResizedCrop | T.Normalize | ToNormalizedTensor) and p != 1.0:
        raise ValueError(f"cannot translate {step!r} inside RandomApply: every view needs it")
    if isinstance(step, T.RandomResizedCrop):
        if step.size[0] != step.size[1]:
            raise ValueError(f"cannot translate {step!r}: batched views are square")
        fields = {"size": step.size[0], "scale": tuple(step.scale), "ratio": tuple(step.ratio)}
        return "crop", {**fields, "interpolation": step.interpolation}
    if isinstance(step, T.RandomHorizontalFlip):
        return "flip", {"flip_p": p * step.p}
    if isinstance(step, T.ColorJitter):
        names = ("brightness", "contrast", "saturation", "hue")
        ranges = {k: None if (r := getattr(step, k)) is None else (float(r[0]), float(r[1])) for k in names}
        return "color jitter", {"jitter_p": p, **ranges}
    if isinstance(step, T.RandomGrayscale):
        return "grayscale", {"grayscale_p": p * step.p}
    if isinstance(step, T.GaussianBlur):
        return "blur", {"blur_p": p, "blur_kernel": tuple(step.kernel_size), "blur_sigma": tuple(step.sigma)}
    if isinstance(step, PILGaussianBlur):
        # PIL's filter is an extended box blur with the Gaussian's exact variance, reaching about
        # 2.4 sigma; a Gaussian kernel of +-3 sigma_max covers it.
        size = 2 * math.ceil(3 * step.radius[1]) + 1
        return "blur", {"blur_p": p, "blur_kernel": (size, size), "blur_sigma": step.radius}
    if isinstance(step, T.RandomSolarize):
        # On PIL images the threshold is on the 0..255 scale; views here are floats in [0, 1].
        return "solarize", {"solarize_p": p * step.p, "solarize_threshold": step.threshold / value_range}
    if isinstance(step, T.Normalize | ToNormalizedTensor):
        return "normalize", {"mean": tuple(map(float, step.mean)), "std": tuple(map(float, step.std))}
    raise ValueError(
        f"cannot translate {step!r} to the batched augmenter: it knows RandomResizedCrop, "
        "RandomHorizontalFlip, ColorJitter, RandomGrayscale, GaussianBlur, PILGaussianBlur, RandomSolarize "
        "and Normalize or ToNormalizedTensor (optionally in RandomApply), plus the no-ops ToRGB and ToTensor"
    )


def view_spec(pipeline: Callable) -> ViewSpec:
    """Read one view's torchvision pipeline into a ``ViewSpec``; ValueError names any step it cannot
    reproduce, a step out of the batched order (crop, flip, jitter, grayscale, blur, solarize,
    normalize) or a pipeline without a RandomResizedCrop."""
    fields: dict = {}
    last, value_range = -1, 255.0
    for step in _flatten(pipeline):
        if isinstance(step, _ToRGB | T.ToTensor):
            value_range = 1.0 if isinstance(step, T.ToTensor) else value_range
            continue  # canvases are RGB already and become floats on the device
        stage, values = _translate(step, 1.0, value_range)
        index = _STAGES.index(stage)
        if index <= last:
            raise ValueError(
                f"cannot translate {step!r}: {stage} after {_STAGES[last]}; the batched augmenter "
                f"applies {', '.join(_STAGES)} in this order, each at most once"
            )
        last = index
        fields.update(values)
    if "size" not in fields:
        raise ValueError(f"the pipeline {pipeline!r} has no RandomResizedCrop to translate")
    return ViewSpec(**fields)


# --- parameters --------------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """Per-sample random parameters of one view (all tensors of length B, on the images' device).

    ``boxes`` are (top, left, height, width) in canvas pixels; ``scale`` and ``log_ratio`` are the
    accepted try's draws (for a sample that fell back to the central crop, the box's own values).
    ``jitter_factors`` are (brightness, contrast, saturation, hue), identity where the op is off;
    ``jitter_order`` is the permutation of ops as torchvision's ``ColorJitter`` draws it.
    """

    boxes: Tensor
    scale: Tensor
    log_ratio: Tensor
    flip: Tensor
    jitter: Tensor
    jitter_factors: Tensor
    jitter_order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    def chunk(self, count: int) -> list[ViewParams]:
        """Split a group drawn for ``count`` crops per image (crop-major rows) into one per crop."""
        return [ViewParams(*parts) for parts in zip(*(t.chunk(count) for t in self._tensors()), strict=True)]

    @staticmethod
    def cat(params: Sequence[ViewParams]) -> ViewParams:
        """The inverse of ``chunk``: several views' parameters as one crop-major group."""
        return ViewParams(*(torch.cat(parts) for parts in zip(*(p._tensors() for p in params), strict=True)))

    def _tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, device=like.device, generator=generator)


def _sample_boxes(
    sizes: Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``RandomResizedCrop.get_params`` for every row of ``sizes`` (N, 2: h, w), tries vectorised."""
    n = sizes.shape[0]
    height, width = sizes[:, 0].float(), sizes[:, 1].float()
    area = (height * width)[:, None]
    tries = torch.rand(n, 2 * _CROP_TRIES, device=sizes.device, generator=generator)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    scales = scale[0] + (scale[1] - scale[0]) * tries[:, :_CROP_TRIES]
    log_ratios = log_low + (log_high - log_low) * tries[:, _CROP_TRIES:]
    w = torch.round(torch.sqrt(area * scales * torch.exp(log_ratios)))
    h = torch.round(torch.sqrt(area * scales / torch.exp(log_ratios)))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits, as the loop stops there
    found = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # Fallback: the whole image, or its central crop with the aspect ratio clamped to ``ratio``.
    in_ratio = width / height
    low_r, high_r = min(ratio), max(ratio)
    fallback_w = torch.where(in_ratio > high_r, torch.round(height * high_r), width)
    fallback_h = torch.where(in_ratio < low_r, torch.round(width / low_r), height)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    offsets = torch.rand(n, 2, device=sizes.device, generator=generator)
    top = torch.minimum(torch.floor(offsets[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(offsets[:, 1] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    drawn_scale = torch.where(found, scales.gather(1, first)[:, 0], h * w / area[:, 0])
    drawn_log_ratio = torch.where(found, log_ratios.gather(1, first)[:, 0], torch.log(w / h))
    return torch.stack([top, left, h, w], dim=1).long(), drawn_scale, drawn_log_ratio


def sample_view_params(spec: ViewSpec, sizes: Tensor, generator: torch.Generator | None = None) -> ViewParams:
    """Draw one view's parameters for every row of ``sizes``; the order of draws is fixed."""
    n = sizes.shape[0]
    boxes, scale, log_ratio = _sample_boxes(sizes, spec.scale, spec.ratio, generator)
    coins = torch.rand(n, 5, device=sizes.device, generator=generator)
    factors = [
        torch.full((n,), identity, device=sizes.device)
        if bounds is None
        else _uniform(n, bounds[0], bounds[1], sizes, generator)
        for bounds, identity in zip(spec.jitter_ranges, P.IDENTITY_FACTORS, strict=True)
    ]
    order = torch.argsort(torch.rand(n, 4, device=sizes.device, generator=generator), dim=1)
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], sizes, generator)
    return ViewParams(
        boxes=boxes,
        scale=scale,
        log_ratio=log_ratio,
        flip=coins[:, 0] < spec.flip_p,
        jitter=coins[:, 1] < spec.jitter_p,
        jitter_factors=torch.stack(factors, dim=1),
        jitter_order=order,
        grayscale=coins[:, 2] < spec.grayscale_p,
        blur=coins[:, 3] < spec.blur_p,
        sigma=sigma,
        solarize=coins[:, 4] < spec.solarize_p,
    )


# --- the module --------------------------------------------------------------------------------------


class BatchViewAugmenter(torch.nn.Module):
    """Whole-batch counterpart of a ``MultiViewTransform``: uint8 canvases -> the same list of views.

    ``forward(images (B, 3, S, S) uint8, sizes (B, 2) | None, generator)`` returns float32 normalised
    views, global views first then local crops, each (B, 3, size, size) on the images' device, as the
    CPU transform's views stacked over the batch. ``sample_params`` and ``apply`` are the two halves.
    """

    def __init__(self, transform: MultiViewTransform) -> None:
        super().__init__()
        self.global_specs = tuple(view_spec(view) for view in transform.global_views)
        self.num_local_crops = transform.num_local_crops if transform.local_view is not None else 0
        self.local_spec = view_spec(transform.local_view) if self.num_local_crops else None
        self.groups: tuple[tuple[ViewSpec, int], ...] = tuple((s, 1) for s in self.global_specs)
        if self.local_spec is not None:
            self.groups += ((self.local_spec, self.num_local_crops),)
        for i, (spec, _) in enumerate(self.groups):
            for name in ("mean", "std"):
                value = torch.tensor(getattr(spec, name) or (), dtype=torch.float32)
                self.register_buffer(f"_{name}{i}", value, persistent=False)

    @classmethod
    def from_recipe(
        cls, recipe: ViewRecipe, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> BatchViewAugmenter:
        """The batched views of ``build_view_transform(recipe, image_size, mean, std)``."""
        return cls(build_view_transform(recipe, image_size, mean, std))

    @property
    def num_views(self) -> int:
        return sum(count for _, count in self.groups)

    @property
    def view_specs(self) -> list[ViewSpec]:
        """One spec per output view, in output order."""
        return [spec for spec, count in self.groups for _ in range(count)]

    def sample_params(self, sizes: Tensor, generator: torch.Generator | None = None) -> list[ViewParams]:
        """Per-sample parameters of every view (one ``ViewParams`` per output view, in output order)
        for images whose valid regions are ``sizes`` (B, 2: h, w), drawn on ``sizes.device``."""
        params: list[ViewParams] = []
        for spec, count in self.groups:
            params += sample_view_params(spec, sizes.repeat(count, 1), generator).chunk(count)
        return params

    def apply(self, images: Tensor, params: Sequence[ViewParams]) -> list[Tensor]:
        """The views of ``images`` (B, 3, S, S: uint8, or float in [0, 1]) for fixed ``params``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, S, S), got {tuple(images.shape)}")
        if len(params) != self.num_views:
            raise ValueError(f"expected parameters for {self.num_views} views, got {len(params)}")
        views: list[Tensor] = []
        start = 0
        # Views are pixels, not activations: under an outer autocast they still need float32.
        with without_autocast(images.device.type):
            pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            for i, (spec, count) in enumerate(self.groups):
                group = ViewParams.cat(params[start : start + count])
                start += count
                out = self._apply_view(pixels, spec, count, group, i)
                views += list(out.view(count, images.shape[0], *out.shape[1:]).unbind(0))
        return views

    def _apply_view(self, pixels: Tensor, spec: ViewSpec, count: int, p: ViewParams, index: int) -> Tensor:
        out = P.crop_resize(pixels, p.boxes, p.flip, spec.size, count, spec.interpolation)
        if spec.jitter_p > 0:
            out = P.color_jitter(out, p.jitter, p.jitter_factors, p.jitter_order, spec.hue is not None)
        if spec.grayscale_p > 0:
            out = P.grayscale(out, p.grayscale)
        if spec.blur_p > 0:
            out = P.gaussian_blur(out, p.blur, p.sigma, spec.blur_kernel)
        if spec.solarize_p > 0:
            out = P.solarize(out, p.solarize, spec.solarize_threshold)
        if spec.mean is not None:
            mean, std = getattr(self, f"_mean{index}"), getattr(self, f"_std{index}")
            out = P.normalize(out, mean.to(out.device), std.to(out.device))  # no-op once moved
        return out

    def forward(
        self, images: Tensor, sizes: Tensor | None = None, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Augmented views of a canvas batch. ``sizes`` (B, 2: valid h, w, as ``ImageCanvas`` gives them)
        None means every canvas is fully valid; ``generator`` must live on the images' device."""
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, 3, S, S), got {tuple(images.shape)}")
        if sizes is None:
            sizes = torch.empty(images.shape[0], 2, dtype=torch.long, device=images.device)
            sizes[:, 0], sizes[:, 1] = images.shape[2], images.shape[3]
        sizes = sizes.to(images.device, non_blocking=True)  # from pinned memory: no wait
        return self.apply(images, self.sample_params(sizes, generator))

    def extra_repr(self) -> str:
        return "\n".join(f"{count} x {spec}" for spec, count in self.groups)
