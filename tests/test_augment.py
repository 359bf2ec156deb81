"""The view recipes produce the papers' views at the dataset's resolution, for any input image mode."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from sslbench.data.augment import (
    MultiViewTransform,
    PILGaussianBlur,
    ToNormalizedTensor,
    ViewRecipe,
    blur_description,
    blurs,
    build_eval_transform,
    build_view_transform,
    crop_sizes,
    gaussian_blur,
    multi_crop,
    to_rgb,
    two_views,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    torch.manual_seed(0)
    random.seed(0)
    yield


def _noise_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _shapes(views: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in views]


def _steps(pipeline: T.Compose) -> list:
    """All steps of a pipeline, with nested Compose and RandomApply flattened (RandomApply kept too)."""
    out = []
    for step in pipeline.transforms:
        out.append(step)
        if isinstance(step, T.Compose | T.RandomApply):
            out.extend(_steps(step))
    return out


def _blur_p(pipeline: T.Compose) -> float:
    ps = [
        s.p
        for s in _steps(pipeline)
        if isinstance(s, T.RandomApply) and isinstance(s.transforms[0], PILGaussianBlur)
    ]
    assert len(ps) <= 1
    return ps[0] if ps else 0.0


def _solarize_p(pipeline: T.Compose) -> float:
    ps = [s.p for s in _steps(pipeline) if isinstance(s, T.RandomSolarize)]
    assert len(ps) <= 1
    return ps[0] if ps else 0.0


def _jitter(pipeline: T.Compose) -> T.ColorJitter:
    (jitter,) = [s for s in _steps(pipeline) if isinstance(s, T.ColorJitter)]
    return jitter


def test_crop_sizes_table() -> None:
    assert crop_sizes(224) == (224, 96)
    assert crop_sizes(32) == (32, 16)
    assert crop_sizes(64) == (64, 32)
    assert crop_sizes(28) == (28, 14)
    assert crop_sizes(96) == (96, 41)
    assert crop_sizes(112) == (112, 48)
    with pytest.raises(ValueError):
        crop_sizes(1)


def test_describe_strings() -> None:
    assert multi_crop(6).describe(32) == "2x32 + 6x16"
    assert multi_crop(10).describe(224) == "2x224 + 10x96"
    assert multi_crop(0).describe(32) == "2x32"
    assert two_views().describe(32) == "2x32"
    assert two_views(asymmetric=True).describe(224) == "2x224"


def test_recipe_constructors_and_validation() -> None:
    assert two_views() == ViewRecipe("symmetric")
    assert two_views(asymmetric=True).kind == "asymmetric"
    recipe = multi_crop(6)
    assert (recipe.kind, recipe.num_local_crops, recipe.num_views) == ("multicrop", 6, 8)
    assert recipe.global_scale == (0.4, 1.0) and recipe.local_scale == (0.05, 0.4)
    assert two_views().global_scale == (0.08, 1.0)
    with pytest.raises(ValueError):
        ViewRecipe("asymmetric", num_local_crops=2)
    with pytest.raises(ValueError):
        ViewRecipe("crop_flip", num_local_crops=2)
    with pytest.raises(ValueError):
        multi_crop(-1)
    with pytest.raises(ValueError):
        multi_crop(2, global_scale=(0.0, 1.0))


def test_symmetric_local_crops_colour_strength_and_crop_flip() -> None:
    """SwAV's multi-crop (SimCLR's distortion on every crop), MoCo v2's strength 0.5, MAE's one view."""
    swav = build_view_transform(ViewRecipe("symmetric", 6, (0.14, 1.0), (0.05, 0.14)), 224, MEAN, STD)
    assert _shapes(swav(_noise_image(300, 200))) == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    jitter = next(step for step in _flatten_steps(swav.local_view) if isinstance(step, T.ColorJitter))
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx(
        (-0.2, 0.2)
    )  # s = 1
    moco = build_view_transform(
        ViewRecipe("symmetric", global_scale=(0.2, 1.0), color_strength=0.5), 224, MEAN, STD
    )
    jitter = next(step for step in _flatten_steps(moco.global_views[0]) if isinstance(step, T.ColorJitter))
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    mae = build_view_transform(ViewRecipe("crop_flip", global_scale=(0.2, 1.0)), 32, MEAN, STD)
    assert _shapes(mae(_noise_image(32, 32))) == [(3, 32, 32)]
    steps = _flatten_steps(mae.global_views[0])
    assert not any(isinstance(step, T.ColorJitter | T.RandomGrayscale) for step in steps)
    assert ViewRecipe("crop_flip").num_views == 1 and ViewRecipe("crop_flip").describe(32) == "1x32"


def _flatten_steps(pipeline) -> list:
    steps = []
    for step in getattr(pipeline, "transforms", [pipeline]):
        steps += _flatten_steps(step) if hasattr(step, "transforms") else [step]
        steps += _flatten_steps(step.transforms[0]) if isinstance(step, T.RandomApply) else []
    return steps


def test_multicrop_shapes_at_32_px() -> None:
    views = build_view_transform(multi_crop(6), 32, MEAN, STD)(_noise_image(32, 32))
    assert _shapes(views) == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6
    assert all(v.dtype == torch.float32 for v in views)


def test_multicrop_shapes_at_224_px() -> None:
    views = build_view_transform(multi_crop(2), 224, MEAN, STD)(_noise_image(300, 200))
    assert _shapes(views) == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2


@pytest.mark.parametrize("recipe", [two_views(), two_views(asymmetric=True)], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("size", [32, 64])
def test_two_view_shapes(recipe: ViewRecipe, size: int) -> None:
    views = build_view_transform(recipe, size, MEAN, STD)(_noise_image(size, size))
    assert _shapes(views) == [(3, size, size)] * 2


def test_multiview_order_is_globals_then_locals() -> None:
    def tag(value: float):
        return lambda image: torch.full((1,), value)

    transform = MultiViewTransform([tag(0.0), tag(1.0)], tag(2.0), num_local_crops=3)
    assert [float(v) for v in transform(_noise_image(4, 4))] == [0.0, 1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        MultiViewTransform([tag(0.0)], None, num_local_crops=1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_any_image_mode_gives_three_channel_views(mode: str) -> None:
    image = _noise_image(32, 32, mode)
    views = build_view_transform(multi_crop(2), 32, MEAN, STD)(image)
    assert _shapes(views) == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert tuple(build_eval_transform(32, MEAN, STD)(image).shape) == (3, 32, 32)


def test_to_rgb_keeps_rgb_images_and_converts_grey() -> None:
    rgb = _noise_image(8, 8)
    assert to_rgb()(rgb) is rgb
    grey = Image.new("L", (8, 8), 77)
    assert to_rgb()(grey).getpixel((3, 3)) == (77, 77, 77)


def test_asymmetric_pipelines_follow_byol_table_6() -> None:
    transform = build_view_transform(two_views(asymmetric=True), 224, MEAN, STD)
    first, second = transform.global_views
    assert (_blur_p(first), _solarize_p(first)) == (1.0, 0.0)
    assert (_blur_p(second), _solarize_p(second)) == (0.1, 0.2)
    for pipeline in (first, second):
        jitter = _jitter(pipeline)
        assert jitter.brightness == (0.6, 1.4) and jitter.saturation == (0.8, 1.2)
        assert jitter.hue == (-0.1, 0.1)


def _solarized_fraction(pipeline: T.Compose, draws: int) -> float:
    """Share of draws in which the view came out solarized.

    A constant bright image (250) survives crop, flip, grayscale, contrast, saturation, hue and blur
    unchanged; brightness jitter keeps it in [150, 255]. Solarizing maps that to [0, 105], so the mean
    of an unnormalised view tells the two apart.
    """
    image = Image.new("RGB", (32, 32), (250, 250, 250))
    solarized = sum(float(pipeline(image).mean()) < 0.5 for _ in range(draws))
    return solarized / draws


def test_asymmetric_solarize_rates_measured() -> None:
    transform = build_view_transform(two_views(asymmetric=True), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    first, second = transform.global_views
    assert _solarized_fraction(first, draws=100) == 0.0
    assert 0.12 < _solarized_fraction(second, draws=300) < 0.28


def test_multicrop_pipelines_follow_dino_reference() -> None:
    at_224 = build_view_transform(multi_crop(4), 224, MEAN, STD)
    first, second = at_224.global_views
    assert (_blur_p(first), _solarize_p(first)) == (1.0, 0.0)
    assert (_blur_p(second), _solarize_p(second)) == (0.1, 0.2)
    assert (_blur_p(at_224.local_view), _solarize_p(at_224.local_view)) == (0.5, 0.0)
    transform = build_view_transform(multi_crop(4), 32, MEAN, STD)
    first, second = transform.global_views
    assert transform.num_local_crops == 4
    crops = [
        s for p in (first, transform.local_view) for s in _steps(p) if isinstance(s, T.RandomResizedCrop)
    ]
    assert [(c.size, c.scale) for c in crops] == [((32, 32), (0.4, 1.0)), ((16, 16), (0.05, 0.4))]
    assert all(c.interpolation == T.InterpolationMode.BICUBIC for c in crops)


def test_symmetric_uses_cifar_recipe_when_small_and_imagenet_recipe_when_large() -> None:
    small = build_view_transform(two_views(), 32, MEAN, STD).global_views
    large = build_view_transform(two_views(), 224, MEAN, STD).global_views
    for views, strength, blur_p in ((small, 0.5, 0.0), (large, 1.0, 0.5)):
        for pipeline in views:
            jitter = _jitter(pipeline)
            assert jitter.brightness == pytest.approx((1 - 0.8 * strength, 1 + 0.8 * strength))
            assert jitter.hue == pytest.approx((-0.2 * strength, 0.2 * strength))
            assert (_blur_p(pipeline), _solarize_p(pipeline)) == (blur_p, 0.0)


def test_blur_is_the_reference_blur_on_crops_of_96_px_or_more() -> None:
    step = gaussian_blur(0.5)
    assert step.p == 0.5 and isinstance(step.transforms[0], PILGaussianBlur)
    assert step.transforms[0].radius == (0.1, 2.0)
    assert (blurs(224), blurs(96), blurs(95), blurs(32)) == (True, True, False, False)
    for recipe in (two_views(), two_views(asymmetric=True), multi_crop(2)):
        small = build_view_transform(recipe, 32, MEAN, STD)
        assert all(_blur_p(p) == 0.0 for p in [*small.global_views, small.local_view] if p is not None)
    between = build_view_transform(multi_crop(2), 128, MEAN, STD)  # crops 128 and 55 px
    assert (_blur_p(between.global_views[0]), _blur_p(between.local_view)) == (1.0, 0.0)


def test_pil_blur_draws_a_uniform_radius_and_applies_pils_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFilter

    image = _noise_image(40, 30)
    blur = PILGaussianBlur((0.5, 1.5))
    torch.manual_seed(3)
    radius = 0.5 + 1.0 * torch.rand(1).item()
    torch.manual_seed(3)
    out = blur(image)
    assert np.array_equal(np.asarray(out), np.asarray(image.filter(ImageFilter.GaussianBlur(radius))))
    radii: list[float] = []
    pil_blur = ImageFilter.GaussianBlur
    monkeypatch.setattr(ImageFilter, "GaussianBlur", lambda radius: radii.append(radius) or pil_blur(radius))
    tiny = _noise_image(4, 4)
    for _ in range(4000):
        blur(tiny)
    radii_t = torch.tensor(radii)
    assert radii_t.min() >= 0.5 and radii_t.max() <= 1.5
    assert abs(radii_t.mean().item() - 1.0) < 0.02 and abs(radii_t.std().item() - 1 / 12**0.5) < 0.02
    with pytest.raises(ValueError, match="0 < low <= high"):
        PILGaussianBlur((2.0, 1.0))


def test_blur_description_names_the_blurred_crops() -> None:
    assert (
        blur_description(multi_crop(10), 224)
        == "PIL Gaussian, sigma U(0.1, 2.0) px on 224 px and 96 px crops"
    )
    assert blur_description(multi_crop(2), 128).endswith("on 128 px crops; none on crops < 96 px")
    assert blur_description(two_views(), 32) == "none (crops < 96 px)"


def test_eval_transform_is_deterministic_and_sized() -> None:
    small = build_eval_transform(32, MEAN, STD)
    image = _noise_image(32, 32)
    first, second = small(image), small(image)
    assert tuple(first.shape) == (3, 32, 32)
    assert torch.equal(first, second)
    # A 32 px image at image_size 32 is not resampled: only ToTensor + Normalize.
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(image))
    assert torch.allclose(first, expected)

    large = build_eval_transform(224, MEAN, STD)
    wide = _noise_image(300, 200)
    out = large(wide)
    assert tuple(out.shape) == (3, 224, 224)
    assert torch.equal(out, large(wide))
    assert tuple(build_eval_transform(32, MEAN, STD)(_noise_image(28, 28)).shape) == (3, 32, 32)


def test_normalisation_of_mid_grey() -> None:
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    out = build_eval_transform(32, MEAN, STD)(grey)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=0.01)
    views = build_view_transform(two_views(), 32, MEAN, STD)(Image.new("L", (32, 32), 128))
    # Jitter moves a grey view's brightness, but it stays a normalised float tensor around that value.
    assert all(v.dtype == torch.float32 and v.abs().max() < 10 for v in views)


def test_normalize_is_torchvisions_to_tensor_then_normalize() -> None:
    image = _noise_image(37, 23)
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(image))
    result = ToNormalizedTensor(MEAN, STD)(image)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
