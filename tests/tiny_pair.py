"""A tiny BYOL pair and its seeded loader, for the tests that train through ``train_loop`` and stop it:
ResNet-18 at 16 px, 8 images in batches of 4 (2 steps an epoch), views seeded per (epoch, image)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sslbench import Method, TrainContext, create_backbone, get_method
from sslbench.data.sampling import EpochSampler, SeededViews

IMAGES, BATCH = 8, 4


class _Source:
    labels = np.arange(IMAGES) % 4

    def __init__(self) -> None:
        self.images = np.random.default_rng(0).integers(0, 255, (IMAGES, 16, 16, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return IMAGES

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def _views(image: Image.Image) -> list[torch.Tensor]:
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    noise = torch.randn_like(tensor) * 0.1  # seeded per (epoch, image) by SeededViews
    return [tensor + noise, tensor - noise]


def tiny_byol_pair(epochs: int) -> tuple[Method, torch.utils.data.DataLoader]:
    """The same seeded method and loader on every call, so two runs can be compared bit for bit."""
    torch.manual_seed(0)
    method_cls = get_method("byol")
    options = method_cls.Config(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    context = TrainContext(epochs, IMAGES // BATCH, 4, 16)
    method = method_cls(create_backbone("resnet18", 16), options, context)
    loader = torch.utils.data.DataLoader(
        SeededViews(_Source(), _views, seed=0),
        batch_size=BATCH,
        sampler=EpochSampler(IMAGES, 0, BATCH),
        generator=torch.Generator().manual_seed(0),
    )
    return method, loader
