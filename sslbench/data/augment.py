"""Augmentations and the papers' view recipes, sized from the dataset's resolution.

Every method sees its views through this module, so a comparison between methods differs only in the
recipe each paper prescribes, never in how a crop or a blur happens to be implemented. The recipes
follow the reference code at 224 px; below that the crop sizes shrink with the image (``crop_sizes``),
and only crops of 96 px or more are blurred (``blurs``), since no reference blurs a smaller one.

All transforms are torchvision v1 transforms on PIL images; their randomness comes from torch's
global generator, so ``torch.manual_seed`` makes a run repeatable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from sslbench.base.small_images import SMALL_IMAGE_MAX

# The reference recipes are written for 224 px crops.
_REFERENCE_SIZE = 224

# Every reference blurs its 224 px and 96 px crops with sigma uniform in (0.1, 2.0) px; none blurs a
# smaller crop (SimCLR's CIFAR recipe has no blur), so smaller crops are not blurred.
BLUR_RADIUS = (0.1, 2.0)
BLUR_MIN_CROP = 96

_BICUBIC = InterpolationMode.BICUBIC


KINDS = ("symmetric", "asymmetric", "multicrop", "crop_flip")


@dataclass(frozen=True)
class ViewRecipe:
    """Which views a method needs.

    kind: 'symmetric' (SimCLR's colour distortion on every view alike; MoCo v2 with ``color_strength``
    0.5 and SwAV with local crops), 'asymmetric' (BYOL's pair), 'multicrop' (DINO: BYOL's photometric
    block, asymmetric global crops, plus local crops), 'crop_flip' (MAE: one view, crop and flip only).
    """

    kind: Literal["symmetric", "asymmetric", "multicrop", "crop_flip"]
    num_local_crops: int = 0
    global_scale: tuple[float, float] = (0.08, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    color_strength: float | None = None  # symmetric: SimCLR's s (None: 1.0, and 0.5 at <= 64 px)

    def __post_init__(self) -> None:
        # Fail at construction, not deep inside a data-loader worker.
        if self.kind not in KINDS:
            raise ValueError(f"unknown view recipe kind {self.kind!r}")
        if self.num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {self.num_local_crops}")
        if self.num_local_crops and self.kind not in ("multicrop", "symmetric"):
            raise ValueError(f"local crops need kind='multicrop' or 'symmetric', got kind={self.kind!r}")
        for name, (low, high) in (("global_scale", self.global_scale), ("local_scale", self.local_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")

    @property
    def num_views(self) -> int:
        """Views per image: the global views (one for 'crop_flip', else two) plus the local crops."""
        return self.num_global_views + self.num_local_crops

    @property
    def num_global_views(self) -> int:
        return 1 if self.kind == "crop_flip" else 2

    def describe(self, image_size: int) -> str:
        """Crop sizes as recorded in result tables, e.g. ``2x32`` or ``2x32 + 6x16``."""
        global_size, local_size = crop_sizes(image_size)
        text = f"{self.num_global_views}x{global_size}"
        if self.num_local_crops:
            text += f" + {self.num_local_crops}x{local_size}"
        return text


def two_views(asymmetric: bool = False) -> ViewRecipe:
    """Two global views: SimCLR's identical pair, or BYOL's asymmetric pair when ``asymmetric``."""
    return ViewRecipe(kind="asymmetric" if asymmetric else "symmetric")


def multi_crop(
    num_local_crops: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> ViewRecipe:
    """DINO's multi-crop: two global crops plus ``num_local_crops`` small local crops (defaults as DINO)."""
    return ViewRecipe("multicrop", num_local_crops, tuple(global_scale), tuple(local_scale))


def crop_sizes(image_size: int) -> tuple[int, int]:
    """(global, local) crop size: (224, 96) at 224 px; at <= 64 px the local crop is image_size // 2
    (32 -> 16); otherwise round(image_size * 96 / 224)."""
    if image_size < 2:
        raise ValueError(f"image_size must be >= 2, got {image_size}")
    if image_size <= SMALL_IMAGE_MAX:
        return image_size, image_size // 2
    return image_size, round(image_size * 96 / _REFERENCE_SIZE)


# --- building blocks ---------------------------------------------------------------------------------


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, P, CMYK, 16-bit) as RGB: jitter and 3-channel normalisation need RGB."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")  # palette transparency converts cleanly only through RGBA
    return image.convert("RGB")


class _ToRGB:
    """Picklable wrapper of ``rgb_image``, so the pipelines survive spawn-based data-loader workers."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return rgb_image(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def to_rgb() -> Callable[[Image.Image], Image.Image]:
    """Convert L/LA/RGBA/P/CMYK to RGB: colour jitter and the 3-channel normalisation need RGB input."""
    return _ToRGB()


def random_resized_crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
    """Random crop resized to ``size``; bicubic as in DINO's reference code."""
    return T.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC)


def color_jitter(
    brightness: float, contrast: float, saturation: float, hue: float, p: float
) -> T.RandomApply:
    """ColorJitter applied with probability ``p``, as all three papers do."""
    return T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=p)


def random_grayscale(p: float) -> T.RandomGrayscale:
    """Grayscale with 3 output channels, so the view still matches the 3-channel backbone."""
    return T.RandomGrayscale(p=p)


def flip_and_color_jitter(
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> T.Compose:
    """Flip, jitter and grayscale: the photometric block every recipe shares (DINO/BYOL defaults)."""
    return T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            color_jitter(brightness, contrast, saturation, hue, jitter_p),
            random_grayscale(grayscale_p),
        ]
    )


class PILGaussianBlur:
    """PIL's Gaussian filter at a radius (sigma, px) drawn uniformly from ``radius``: the DINO reference's
    ``GaussianBlur``, about 45x cheaper on a 224 px image than torchvision's 23 px kernel on a PIL image.

    The radius comes from torch's global generator (the reference draws from Python's ``random``), so
    ``torch.manual_seed`` makes a run repeatable as for every other step.
    """

    def __init__(self, radius: tuple[float, float] = BLUR_RADIUS) -> None:
        low, high = radius
        if not 0.0 < low <= high:
            raise ValueError(f"blur radius must satisfy 0 < low <= high, got {radius}")
        self.radius = (float(low), float(high))

    def __call__(self, image: Image.Image) -> Image.Image:
        low, high = self.radius
        sigma = low + (high - low) * torch.rand(1).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(radius={self.radius})"


def gaussian_blur(p: float) -> T.RandomApply:
    """Gaussian blur with probability ``p``, sigma uniform in (0.1, 2.0) px, as every reference draws it
    and as DINO's applies it (PIL). Only for crops of ``BLUR_MIN_CROP`` px or more (``blurs``)."""
    return T.RandomApply([PILGaussianBlur(BLUR_RADIUS)], p=p)


def blurs(crop_size: int) -> bool:
    """Whether a crop of ``crop_size`` px is blurred: the references blur their 224 and 96 px crops
    only; on smaller crops the reference sigma would wipe out the image and a scaled one (<= 0.3 px
    at 32 px) changes nothing, so they have none, like SimCLR's CIFAR recipe."""
    return crop_size >= BLUR_MIN_CROP


def blur_description(recipe: ViewRecipe, image_size: int) -> str:
    """The blur as the protocol records it, e.g. ``none (crops < 96 px)``."""
    global_size, local_size = crop_sizes(image_size)
    sizes = [global_size] + ([local_size] if recipe.num_local_crops else [])
    blurred = [size for size in sizes if blurs(size)]
    low, high = BLUR_RADIUS
    if not blurred:
        return f"none (crops < {BLUR_MIN_CROP} px)"
    text = f"PIL Gaussian, sigma U({low}, {high}) px on {' and '.join(f'{s} px' for s in blurred)} crops"
    if len(blurred) < len(sizes):
        text += f"; none on crops < {BLUR_MIN_CROP} px"
    return text


def solarize(p: float) -> T.RandomSolarize:
    """Invert pixels >= 128 with probability ``p`` (PIL ``ImageOps.solarize``), as BYOL and DINO."""
    return T.RandomSolarize(threshold=128, p=p)


class ToNormalizedTensor:
    """8-bit RGB PIL image -> float (3, H, W) tensor ``(x / 255 - mean) / std``: torchvision's ToTensor
    then Normalize in one pass over the pixels (3x faster; equal to float rounding)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self._shift = torch.tensor(self.mean).view(3, 1, 1) * 255
        self._scale = 1 / (torch.tensor(self.std).view(3, 1, 1) * 255)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return pixels.float().sub_(self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def normalize(mean: Sequence[float], std: Sequence[float]) -> ToNormalizedTensor:
    """PIL image to a float tensor normalised with the dataset's statistics."""
    return ToNormalizedTensor(mean, std)


# --- recipes -----------------------------------------------------------------------------------------


class MultiViewTransform:
    """Callable: PIL image (any mode: L, RGBA, P, RGB) -> list[Tensor] of normalised float views,
    global crops first then local crops.

    The per-view pipelines stay public attributes so that tests and run records can inspect them.
    """

    def __init__(
        self,
        global_views: Sequence[Callable[[Image.Image], torch.Tensor]],
        local_view: Callable[[Image.Image], torch.Tensor] | None = None,
        num_local_crops: int = 0,
    ) -> None:
        if num_local_crops and local_view is None:
            raise ValueError("num_local_crops > 0 needs a local_view pipeline")
        self.global_views = tuple(global_views)
        self.local_view = local_view
        self.num_local_crops = num_local_crops

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        views = [pipeline(image) for pipeline in self.global_views]
        if self.local_view is not None:
            views.extend(self.local_view(image) for _ in range(self.num_local_crops))
        return views

    def __repr__(self) -> str:
        lines = [f"  global view {i}: {view!r}" for i, view in enumerate(self.global_views)]
        if self.local_view is not None and self.num_local_crops:
            lines.append(f"  {self.num_local_crops} x local view: {self.local_view!r}")
        return "MultiViewTransform(\n" + "\n".join(lines) + "\n)"


def _view_pipeline(
    crop_size: int,
    scale: tuple[float, float],
    photometric: T.Compose,
    blur_p: float,
    solarize_p: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> T.Compose:
    """One view in the order all three references use; steps with probability 0 are left out."""
    steps: list[Callable] = [to_rgb(), random_resized_crop(crop_size, scale), photometric]
    if blur_p > 0 and blurs(crop_size):
        steps.append(gaussian_blur(blur_p))
    if solarize_p > 0:
        steps.append(solarize(solarize_p))
    steps.append(normalize(mean, std))
    return T.Compose(steps)


def build_view_transform(
    recipe: ViewRecipe, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> MultiViewTransform:
    """The paper's views for ``recipe`` at the dataset's resolution.

    - symmetric, SimCLR (Chen et al. 2020, arXiv 2002.05709, Appendix A): crop, flip,
      ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8, grayscale p=0.2, blur p=0.5; at <= 64 px the
      paper's CIFAR recipe: strength s=0.5 (s=1.0 otherwise), or ``color_strength``. Both views alike,
      and so are local crops if any (SwAV, Caron et al. 2020, arXiv 2006.09882: blur p=0.5 on all).
    - crop_flip, MAE (He et al. 2022, arXiv 2111.06377): one view, random resized crop and flip.
    - asymmetric, BYOL (Grill et al. 2020, arXiv 2006.07733, Table 6): crop, flip,
      ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; view 0 blur p=1.0, solarize p=0;
      view 1 blur p=0.1, solarize p=0.2.
    - multicrop, DINO (Caron et al. 2021, arXiv 2104.14294, ``DataAugmentationDINO``): the BYOL
      photometric block on every crop; global crop 0 blur p=1.0; global crop 1 blur p=0.1,
      solarize p=0.2; each local crop blur p=0.5 at the local crop size and ``local_scale``.

    Blur, where a recipe has it, only on crops of 96 px or more (``blurs``): at <= 64 px no view is
    blurred, as in SimCLR's CIFAR recipe.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (views are RGB), got {list(mean)} and {list(std)}")
    global_size, local_size = crop_sizes(image_size)
    small = image_size <= SMALL_IMAGE_MAX

    def view(size: int, scale: tuple[float, float], photometric: T.Compose, blur_p: float, sol_p: float):
        return _view_pipeline(size, scale, photometric, blur_p, sol_p, mean, std)

    if recipe.kind == "crop_flip":
        flip = T.Compose([T.RandomHorizontalFlip(p=0.5)])
        return MultiViewTransform([view(global_size, recipe.global_scale, flip, 0.0, 0.0)])
    if recipe.kind == "symmetric":
        s = recipe.color_strength if recipe.color_strength is not None else (0.5 if small else 1.0)
        photometric = flip_and_color_jitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        pipeline = view(global_size, recipe.global_scale, photometric, 0.5, 0.0)
        local = (
            view(local_size, recipe.local_scale, photometric, 0.5, 0.0) if recipe.num_local_crops else None
        )
        return MultiViewTransform([pipeline, pipeline], local, recipe.num_local_crops)

    photometric = flip_and_color_jitter(0.4, 0.4, 0.2, 0.1)
    globals_ = [
        view(global_size, recipe.global_scale, photometric, 1.0, 0.0),
        view(global_size, recipe.global_scale, photometric, 0.1, 0.2),
    ]
    if recipe.kind == "asymmetric":
        return MultiViewTransform(globals_)
    local = view(local_size, recipe.local_scale, photometric, 0.5, 0.0)
    return MultiViewTransform(globals_, local, recipe.num_local_crops)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """No augmentation. <= 64 px: resize to image_size if needed then normalise. Larger:
    Resize(round(image_size*256/224)) + CenterCrop(image_size) (the standard ImageNet eval protocol).

    Small images are resized on the short side and centre-cropped, which is a no-op for images already
    at ``image_size`` and keeps the aspect ratio for those that are not.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (images are RGB), got {list(mean)} and {list(std)}")
    resize_to = image_size if image_size <= SMALL_IMAGE_MAX else round(image_size * 256 / _REFERENCE_SIZE)
    return T.Compose(
        [
            to_rgb(),
            T.Resize(resize_to, interpolation=_BICUBIC),
            T.CenterCrop(image_size),
            normalize(mean, std),
        ]
    )
