"""The loader's part of the batched augmentation path: each image decoded onto a fixed-size canvas.

Images of different sizes then collate into one uint8 batch without resizing away their aspect ratio;
the valid (h, w) travels beside each canvas so that crops on the device are drawn from the image, not
from the padding (``sslbench.data.gpu_augment``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.data.augment import _REFERENCE_SIZE, rgb_image


def canvas_size_for(image_size: int) -> int:
    """Canvas side for a dataset at ``image_size``: the images themselves up to 64 px (CIFAR-like, never
    resampled), else round(image_size * 256 / 224), the usual resize before a 224 px crop."""
    if image_size <= SMALL_IMAGE_MAX:
        return image_size
    return round(image_size * 256 / _REFERENCE_SIZE)


class ImageCanvas:
    """Picklable CPU transform: PIL image (any mode) -> (uint8 (3, S, S) canvas, tensor([h, w])).

    The image is shrunk (aspect kept, bicubic) only if its longer side exceeds S, then padded with
    zeros at the bottom and right; (h, w) is the valid region, from which crops are drawn, so a crop's
    scale is relative to the image and not to the padding.
    """

    def __init__(self, canvas_size: int) -> None:
        if canvas_size < 1:
            raise ValueError(f"canvas_size must be >= 1, got {canvas_size}")
        self.canvas_size = canvas_size

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        image = rgb_image(image)
        size = self.canvas_size
        width, height = image.size
        if max(width, height) > size:
            shrink = size / max(width, height)
            width, height = (max(1, min(size, round(side * shrink))) for side in (width, height))
            image = image.resize((width, height), Image.BICUBIC)
        canvas = torch.zeros(3, size, size, dtype=torch.uint8)
        canvas[:, :height, :width] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return canvas, torch.tensor([height, width])

    def __repr__(self) -> str:
        return f"ImageCanvas({self.canvas_size})"
