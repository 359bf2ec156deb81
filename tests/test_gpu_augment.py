"""The batched views reproduce the CPU recipes: same views and shapes, same parameter distributions
(read from the CPU pipeline objects), and per-sample pixel ops equal to torchvision's functional ops.

Tolerances. Against ``torchvision.transforms.functional`` on the same float tensor every op agrees to
float32 rounding (1e-5; 1e-4 after normalisation, which divides by std ~ 0.25), the crop included:
the batched crop uses the antialiased separable kernel of PIL / ``interpolate(antialias=True)``.
Against the CPU path itself (PIL, bicubic on uint8) the crop agrees to 1.5/255 on smooth images: PIL
rounds to 8 bits after each of its two resampling passes and this path stays in float. On sharp,
noise-like edges PIL also clips the bicubic overshoot between its passes, so single pixels there may
differ by several /255 (a documented difference, not tested).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from sslbench.data import gpu_photometric as P
from sslbench.data.augment import PILGaussianBlur, build_view_transform, multi_crop, two_views
from sslbench.data.gpu_augment import BatchViewAugmenter, ViewParams, ViewSpec, sample_view_params, view_spec
from sslbench.data.image_canvas import ImageCanvas, canvas_size_for

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
RECIPES = {"symmetric": two_views(), "asymmetric": two_views(asymmetric=True), "multicrop": multi_crop(3)}
# Two-sample Kolmogorov-Smirnov critical coefficient at alpha = 1e-3 (conservative for the discrete
# distributions of rounded crop boxes).
KS_C = 1.95


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _smooth(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images without sharp edges, where PIL's 8-bit passes and float resampling agree."""
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _ks_threshold(n: int, m: int) -> float:
    return KS_C * math.sqrt((n + m) / (n * m))


def _find(step, cls: type):
    """The first ``cls`` step inside a pipeline (through Compose and RandomApply), or None."""
    if isinstance(step, cls):
        return step
    for inner in getattr(step, "transforms", []):
        if (found := _find(inner, cls)) is not None:
            return found
    return None


def _cpu_probabilities(pipeline: T.Compose) -> dict[str, float]:
    """Each random step's probability, read from the CPU pipeline objects (0 where absent)."""
    found = {"flip": 0.0, "jitter": 0.0, "grayscale": 0.0, "blur": 0.0, "solarize": 0.0}

    def walk(step, p: float) -> None:
        if isinstance(step, T.Compose):
            for inner in step.transforms:
                walk(inner, p)
        elif isinstance(step, T.RandomApply):
            for inner in step.transforms:
                walk(inner, p * step.p)
        elif isinstance(step, T.RandomHorizontalFlip):
            found["flip"] = p * step.p
        elif isinstance(step, T.ColorJitter):
            found["jitter"] = p
        elif isinstance(step, T.RandomGrayscale):
            found["grayscale"] = p * step.p
        elif isinstance(step, PILGaussianBlur):
            found["blur"] = p
        elif isinstance(step, T.RandomSolarize):
            found["solarize"] = p * step.p

    walk(pipeline, 1.0)
    return found


# --- views, shapes, determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 96])
@pytest.mark.parametrize("kind", list(RECIPES))
def test_views_match_cpu_transform(kind: str, image_size: int) -> None:
    recipe = RECIPES[kind]
    cpu = build_view_transform(recipe, image_size, MEAN, STD)
    image = Image.fromarray(_noise(image_size + 7, image_size + 30))  # larger and not square
    expected = [tuple(view.shape) for view in cpu(image)]
    canvas = ImageCanvas(canvas_size_for(image_size))
    images, sizes = zip(*(canvas(image) for _ in range(2)), strict=True)
    views = BatchViewAugmenter(cpu)(torch.stack(images), torch.stack(sizes), torch.Generator().manual_seed(0))
    assert [tuple(view.shape[1:]) for view in views] == expected
    assert all(view.shape[0] == 2 and view.dtype == torch.float32 for view in views)
    assert all(torch.isfinite(view).all() for view in views)


def test_generator_makes_forward_deterministic() -> None:
    augmenter = BatchViewAugmenter.from_recipe(multi_crop(2), 32, MEAN, STD)
    images = torch.from_numpy(_noise(32, 32)).permute(2, 0, 1).expand(4, 3, 32, 32)

    def run(seed: int) -> list[torch.Tensor]:
        return augmenter(images, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast leaves the views float32
        assert all(torch.equal(a, b) for a, b in zip(first, run(1), strict=True))


def test_crops_never_read_the_padding() -> None:
    """A black valid region in a white-padded canvas gives all-zero views: no sample lands outside."""
    augmenter = BatchViewAugmenter.from_recipe(multi_crop(2), 96, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images = torch.full((8, 3, 110, 110), 255, dtype=torch.uint8)
    sizes = torch.tensor([[110, 3], [1, 110], [50, 70], [110, 110], [7, 9], [64, 20], [2, 2], [99, 100]])
    for b, (h, w) in enumerate(sizes.tolist()):
        images[b, :, :h, :w] = 0
    for view in augmenter(images, sizes, torch.Generator().manual_seed(0)):
        assert view.abs().max() == 0


@pytest.mark.parametrize("kind", list(RECIPES))
def test_forward_never_reads_tensor_values(kind: str) -> None:
    """Meta tensors hold no data, so any host read (.item(), a mask index, a branch on a value) fails:
    the CPU stand-in for the CUDA no-synchronisation check below."""
    augmenter = BatchViewAugmenter.from_recipe(RECIPES[kind], 96, MEAN, STD).to("meta")
    views = augmenter(torch.empty(4, 3, 110, 110, dtype=torch.uint8, device="meta"))
    assert [v.shape[-1] for v in views] == [96, 96] + [41] * RECIPES[kind].num_local_crops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_never_synchronises_on_cuda() -> None:
    augmenter = BatchViewAugmenter.from_recipe(multi_crop(4), 96, MEAN, STD).cuda()
    images = torch.randint(0, 256, (8, 3, 110, 110), dtype=torch.uint8, device="cuda")
    sizes = torch.full((8, 2), 100, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    augmenter(images, sizes, generator)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = augmenter(images, sizes, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views[-1].device.type == "cuda"


# --- translation from the CPU pipeline ----------------------------------------------------------------


def test_view_spec_reads_the_cpu_pipeline() -> None:
    cpu = build_view_transform(multi_crop(2), 224, MEAN, STD)
    spec = view_spec(cpu.global_views[1])
    assert (spec.size, spec.scale, spec.interpolation) == (224, (0.4, 1.0), InterpolationMode.BICUBIC)
    assert spec.brightness == pytest.approx((0.6, 1.4)) and spec.hue == pytest.approx((-0.1, 0.1))
    assert (spec.blur_p, spec.blur_kernel, spec.blur_sigma) == (0.1, (13, 13), pytest.approx((0.1, 2.0)))
    assert spec.solarize_threshold == pytest.approx(128 / 255) and spec.mean == pytest.approx(MEAN)
    assert view_spec(cpu.local_view).size == 96
    on_tensors = T.Compose([T.RandomResizedCrop(8), T.ToTensor(), T.RandomSolarize(0.5, p=0.3)])
    assert (view_spec(on_tensors).solarize_threshold, view_spec(on_tensors).solarize_p) == (0.5, 0.3)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([T.RandomResizedCrop(8), T.RandomRotation(10)], "RandomRotation"),
        ([T.RandomResizedCrop(8), T.RandomGrayscale(0.2), T.ColorJitter(0.4)], "jitter after grayscale"),
        ([T.RandomHorizontalFlip()], "no RandomResizedCrop"),
        ([T.RandomResizedCrop(8), T.RandomApply([T.ColorJitter(0.4), T.RandomGrayscale()])], "exactly one"),
    ],
)
def test_untranslatable_pipelines_are_refused(steps: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        view_spec(T.Compose(steps))


# --- parameter distributions -------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "size"), [((0.08, 1.0), (75, 100)), ((0.05, 0.4), (60, 45))])
def test_crop_boxes_follow_torchvision(scale: tuple[float, float], size: tuple[int, int]) -> None:
    height, width = size
    spec = ViewSpec(16, scale, (3 / 4, 4 / 3), InterpolationMode.BICUBIC)
    n, m = 20_000, 10_000
    sizes = torch.tensor([[height, width]]).expand(n, 2)
    boxes = sample_view_params(spec, sizes, torch.Generator().manual_seed(0)).boxes
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    draw = T.RandomResizedCrop.get_params
    reference = torch.tensor([draw(image, list(scale), [3 / 4, 4 / 3]) for _ in range(m)])
    limit = _ks_threshold(n, m)
    assert _ks(h * w / (height * width), reference[:, 2] * reference[:, 3] / (height * width)) < limit
    assert _ks(w / h, reference[:, 3] / reference[:, 2]) < limit
    assert _ks(top.float(), reference[:, 0].float()) < limit
    assert _ks(left.float(), reference[:, 1].float()) < limit


def test_jitter_and_blur_draws_are_uniform_in_the_cpu_ranges() -> None:
    cpu = build_view_transform(two_views(), 96, MEAN, STD)
    jitter = _find(cpu.global_views[0], T.ColorJitter)
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    ranges.append(_find(cpu.global_views[0], PILGaussianBlur).radius)
    n = 20_000
    sizes = torch.full((n, 2), 80)
    params = BatchViewAugmenter(cpu).sample_params(sizes, torch.Generator().manual_seed(0))[0]
    draws = [*params.jitter_factors.unbind(1), params.sigma]
    for values, (low, high) in zip(draws, ranges, strict=True):
        assert low <= values.min() and values.max() <= high
        uniform = torch.linspace(low, high, n)  # the ideal sample: KS against it ~ one-sample KS
        assert _ks(values, uniform) < KS_C / math.sqrt(n)
    order = params.jitter_order
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    position_counts = torch.stack([(order == op).float().mean(0) for op in range(4)])
    assert (position_counts - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.parametrize(
    ("kind", "image_size"), [("symmetric", 32), ("symmetric", 96), ("asymmetric", 32), ("multicrop", 96)]
)
def test_probabilities_match_the_cpu_pipeline(kind: str, image_size: int) -> None:
    cpu = build_view_transform(RECIPES[kind], image_size, MEAN, STD)
    pipelines = list(cpu.global_views) + [cpu.local_view] * cpu.num_local_crops
    n = 20_000
    params = BatchViewAugmenter(cpu).sample_params(torch.full((n, 2), 50), torch.Generator().manual_seed(1))
    assert len(params) == len(pipelines)
    for pipeline, view in zip(pipelines, params, strict=True):
        for name, p in _cpu_probabilities(pipeline).items():
            rate = getattr(view, name).float().mean().item()
            assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n), (name, rate, p)


# --- pixel ops against torchvision -------------------------------------------------------------------

# Whole image, wide, tall (up one axis, down the other), a single pixel, a corner, off-centre.
BOXES = torch.tensor(
    [[0, 0, 40, 40], [3, 5, 10, 30], [10, 2, 25, 7], [0, 0, 1, 1], [20, 20, 20, 20], [5, 6, 33, 12]]
)
FLIPS = torch.tensor([False, True, False, True, False, True])


@pytest.mark.parametrize("interpolation", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
@pytest.mark.parametrize("out_size", [16, 57])
def test_crop_resize_flip_match_torchvision(interpolation: InterpolationMode, out_size: int) -> None:
    pixels = torch.from_numpy(_noise(40, 40)).permute(2, 0, 1).float().div(255).repeat(6, 1, 1, 1)
    pixels = pixels.roll(shifts=(3, 5), dims=(2, 3)) * torch.linspace(0.5, 1.0, 6)[:, None, None, None]
    got = P.crop_resize(pixels, BOXES, FLIPS, out_size, 1, interpolation)
    for b, (top, left, h, w) in enumerate(BOXES.tolist()):
        ref = F.resized_crop(pixels[b], top, left, h, w, [out_size, out_size], interpolation, antialias=True)
        ref = F.hflip(ref) if FLIPS[b] else ref
        torch.testing.assert_close(got[b], ref.clamp(0, 1), atol=1e-5, rtol=0)


def test_crop_matches_the_pil_cpu_path_on_smooth_images() -> None:
    images = _smooth(6, 40)
    got = P.crop_resize(images.float() / 255, BOXES, FLIPS, 32, 1, InterpolationMode.BICUBIC)
    for b, (top, left, h, w) in enumerate(BOXES.tolist()):
        ref = F.resized_crop(F.to_pil_image(images[b]), top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        difference = (got[b] - F.to_tensor(F.hflip(ref) if FLIPS[b] else ref)).abs()
        assert difference.max() <= 1.5 / 255 and difference.mean() <= 0.5 / 255


def test_several_crops_per_image_are_laid_out_crop_major() -> None:
    pixels = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15], [2, 3, 8, 9], [0, 0, 20, 20]])
    flips = torch.tensor([False, True, True, False])
    got = P.crop_resize(pixels, boxes, flips, 8, 2, InterpolationMode.BICUBIC)
    for k in range(2):
        for b in range(2):
            row = slice(k * 2 + b, k * 2 + b + 1)
            alone = P.crop_resize(pixels[b : b + 1], boxes[row], flips[row], 8, 1, InterpolationMode.BICUBIC)
            torch.testing.assert_close(got[row], alone, atol=1e-6, rtol=0)


_JITTER_OPS = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]


def _jitter_draws(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    low, high = torch.tensor([0.2, 0.2, 0.0, -0.5]), torch.tensor([1.8, 1.8, 2.0, 0.5])
    factors = low + (high - low) * torch.rand(n, 4, generator=g)
    return factors, torch.argsort(torch.rand(n, 4, generator=g), dim=1)


@pytest.mark.parametrize("op", range(4), ids=["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_op_matches_torchvision(op: int) -> None:
    pixels = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    factors, order = _jitter_draws(16)
    identity = torch.tensor(P.IDENTITY_FACTORS).expand(16, 4).clone()
    identity[:, op] = factors[:, op]
    got = P.color_jitter(pixels, torch.ones(16, dtype=torch.bool), identity, order)
    for b in range(16):
        ref = _JITTER_OPS[op](pixels[b], factors[b, op].item())
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=0)


def test_color_jitter_follows_each_samples_order() -> None:
    pixels = torch.rand(48, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    factors, order = _jitter_draws(48)
    applied = torch.arange(48) % 5 != 0
    got = P.color_jitter(pixels, applied, factors, order)
    for b in range(48):
        ref = pixels[b]
        for op in order[b].tolist() if applied[b] else []:
            ref = _JITTER_OPS[op](ref, factors[b, op].item())
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=0)


def test_grayscale_blur_solarize_normalize_match_torchvision() -> None:
    pixels = torch.rand(8, 3, 15, 15, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([True, False] * 4)
    sigma = torch.linspace(0.1, 2.0, 8)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    gray, blur = P.grayscale(pixels, mask), P.gaussian_blur(pixels, mask, sigma, (7, 5))
    solar, normal = P.solarize(pixels, mask, 128 / 255), P.normalize(pixels, mean, std)
    for b in range(8):
        on = bool(mask[b])
        ref_gray = F.rgb_to_grayscale(pixels[b], 3) if on else pixels[b]
        ref_blur = F.gaussian_blur(pixels[b], [7, 5], [sigma[b].item()] * 2) if on else pixels[b]
        torch.testing.assert_close(gray[b], ref_gray, atol=1e-6, rtol=0)
        torch.testing.assert_close(blur[b], ref_blur, atol=1e-5, rtol=0)
        assert torch.equal(solar[b], F.solarize(pixels[b], 128 / 255) if on else pixels[b])
        torch.testing.assert_close(normal[b], F.normalize(pixels[b], MEAN, STD), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.7, 2.0])
def test_blur_matches_pils_filter_at_the_same_sigma(sigma: float) -> None:
    """The CPU recipe blurs with PIL (three box passes of the Gaussian's variance, on 8 bits); the
    batched one with the exact Gaussian of the same sigma. Away from the borders (PIL extends edges,
    torchvision reflects) they differ by about half an 8-bit level on average, and at single pixels by
    up to 6/255 near sigma 0.3, where three box passes approximate the Gaussian most coarsely."""
    spec = view_spec(build_view_transform(multi_crop(2), 224, MEAN, STD).global_views[0])
    image = _smooth(1, 96, seed=2)
    applied, sigmas = torch.tensor([True]), torch.tensor([sigma])
    blurred = P.gaussian_blur(image.float() / 255, applied, sigmas, spec.blur_kernel)[0]
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(sigma))
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    inside = (slice(None), slice(8, -8), slice(8, -8))
    difference = (blurred[inside] - reference[inside]).abs() * 255
    assert difference.mean() < 0.65 and difference.max() < 6


def _reference_view(image: torch.Tensor, spec: ViewSpec, p: ViewParams, b: int) -> torch.Tensor:
    """One sample's view through torchvision's functional ops in the CPU pipeline's order."""
    top, left, h, w = p.boxes[b].tolist()
    x = F.resized_crop(image, top, left, h, w, [spec.size] * 2, spec.interpolation, antialias=True)
    x = x.clamp(0, 1)
    x = F.hflip(x) if p.flip[b] else x
    if p.jitter[b]:
        for op in p.jitter_order[b].tolist():
            if spec.jitter_ranges[op] is not None:
                x = _JITTER_OPS[op](x, p.jitter_factors[b, op].item())
    x = F.rgb_to_grayscale(x, 3) if p.grayscale[b] else x
    x = F.gaussian_blur(x, list(spec.blur_kernel), [p.sigma[b].item()] * 2) if p.blur[b] else x
    x = F.solarize(x, spec.solarize_threshold) if p.solarize[b] else x
    return F.normalize(x, spec.mean, spec.std)


def test_apply_matches_torchvision_per_sample() -> None:
    augmenter = BatchViewAugmenter.from_recipe(multi_crop(2), 96, MEAN, STD)
    images = _smooth(4, 110, seed=4)
    sizes = torch.tensor([[110, 110], [90, 110], [110, 60], [40, 50]])
    params = augmenter.sample_params(sizes, torch.Generator().manual_seed(5))
    views = augmenter.apply(images, params)
    for view, spec, p in zip(views, augmenter.view_specs, params, strict=True):
        for b in range(4):
            ref = _reference_view(images[b].float() / 255, spec, p, b)
            torch.testing.assert_close(view[b], ref, atol=1e-4, rtol=0)
