"""The loader's canvas for the batched augmentation path: padding, shrinking, modes, collation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sslbench.data.image_canvas import ImageCanvas, canvas_size_for


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_canvas_size_for() -> None:
    assert [canvas_size_for(s) for s in (16, 32, 64, 96, 224)] == [16, 32, 64, 110, 256]


def test_canvas_pads_small_images_bottom_right() -> None:
    pixels = _noise(10, 20)
    canvas, size = ImageCanvas(32)(Image.fromarray(pixels))
    assert canvas.dtype == torch.uint8 and canvas.shape == (3, 32, 32) and size.tolist() == [10, 20]
    assert torch.equal(canvas[:, :10, :20], torch.from_numpy(pixels).permute(2, 0, 1))
    assert canvas[:, 10:].eq(0).all() and canvas[:, :, 20:].eq(0).all()


def test_canvas_shrinks_large_images_keeping_the_aspect_ratio() -> None:
    image = Image.fromarray(_noise(50, 100))
    canvas, size = ImageCanvas(32)(image)
    assert size.tolist() == [16, 32]
    shrunk = np.array(image.resize((32, 16), Image.BICUBIC))
    assert torch.equal(canvas[:, :16, :32], torch.from_numpy(shrunk).permute(2, 0, 1))
    assert canvas[:, 16:].eq(0).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_canvas_accepts_any_mode(mode: str) -> None:
    canvas, size = ImageCanvas(16)(Image.fromarray(_noise(12, 16)).convert(mode))
    assert canvas.shape == (3, 16, 16) and size.tolist() == [12, 16]
    if mode == "L":
        assert torch.equal(canvas[0], canvas[1]) and torch.equal(canvas[1], canvas[2])


def test_canvas_pickles_and_collates() -> None:
    canvas = pickle.loads(pickle.dumps(ImageCanvas(16)))
    batch = [canvas(Image.fromarray(_noise(9, 16 + i))) for i in range(3)]
    images, sizes = torch.utils.data.default_collate(batch)
    assert images.shape == (3, 3, 16, 16) and sizes.tolist() == [[9, 16], [8, 16], [8, 16]]
