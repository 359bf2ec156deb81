"""Augmentation throughput: the CPU view recipe in DataLoader workers vs the batched augmenter.

DINO multi-crop views (2 global + 10 local crops: 2x224 + 10x96 at 224 px, 2x32 + 10x16 at 32 px),
in images per second, for

- ``cpu``: ``build_view_transform`` on PIL images through a DataLoader with ``workers`` workers, the
  path the runner uses today;
- ``canvas``: the same DataLoader running only ``ImageCanvas`` (shrink to the canvas and pad), the
  CPU work the batched path still needs per image;
- ``batched``: ``BatchViewAugmenter`` on ``device`` for a uint8 canvas batch already there.

Source images are random pixels already decoded (no JPEG decoding in any path), 500x375 scaled with
the view size above 64 px (the most common ImageNet shape), square at the view size up to 64 px.

Run: ``python benchmarks/bench_augment.py --device cuda --image-size 224 --batch 256 --workers 16``;
a quick CPU check: ``python benchmarks/bench_augment.py --device cpu --image-size 32 --batch 64
--seconds 2``. ``augmentation_rates`` is the importable entry point (``benchmarks/gpu_check.py`` puts
this folder on sys.path and imports it); its signature and keys are stable.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.data.augment import build_view_transform, multi_crop
from sslbench.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ArraySource, TransformDataset
from sslbench.data.gpu_augment import BatchViewAugmenter
from sslbench.data.image_canvas import ImageCanvas, canvas_size_for

DISTINCT_IMAGES = 32  # random source images, cycled: enough to defeat caches, cheap to make


class _CycledSource:
    """``length`` images cycling over a few in-memory ones, so a DataLoader never runs dry."""

    def __init__(self, source: ArraySource, length: int) -> None:
        self.source, self.length = source, length
        self.labels = np.zeros(length, dtype=np.int64)

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> Image.Image:
        return self.source.load(index % len(self.source))


def source_shape(image_size: int) -> tuple[int, int]:
    """(height, width) of the benchmark's source images for views of ``image_size``."""
    if image_size <= SMALL_IMAGE_MAX:
        return image_size, image_size
    return round(image_size * 375 / 224), round(image_size * 500 / 224)


def _loader_rate(dataset: TransformDataset, batch: int, workers: int, seconds: float) -> float:
    """Images/s of a DataLoader after its first batch (worker start-up excluded).

    With no workers the main process does a worker's job, so it gets a worker's single intra-op
    thread (DataLoader workers run with one): per-image ops are tiny and threads only add hand-offs.
    """
    previous = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    try:
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
        batches: Iterable = iter(loader)
        next(batches)
        images, start = 0, time.perf_counter()
        for _ in batches:
            images += batch
            if time.perf_counter() - start >= seconds:
                break
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def _batched_rate(
    augmenter: BatchViewAugmenter, images: torch.Tensor, sizes: torch.Tensor, seconds: float, seed: int
) -> float:
    """Images/s of the batched augmenter, timed between device synchronisations."""
    device = images.device
    generator = torch.Generator(device).manual_seed(seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: allocator, kernel selection
        augmenter(images, sizes, generator)
    sync()
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        augmenter(images, sizes, generator)
        steps += 1
    sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def augmentation_rates(
    device: str | torch.device = "cpu",
    image_size: int = 224,
    batch: int = 64,
    workers: int = 0,
    seconds: float = 5.0,
    num_local_crops: int = 10,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, float | int | str]:
    """Images/s of DINO multi-crop augmentation on the CPU path and on the batched path.

    Returns ``{"cpu", "canvas", "batched"}`` in images/s (see the module docstring) plus the settings:
    ``views`` (e.g. ``"2x224 + 10x96"``), ``device``, ``image_size``, ``batch``, ``workers``,
    ``source`` (``"HxW"``). Each rate is measured for about ``seconds`` after a warm-up.

    ``threads``: torch intra-op threads for the batched path; None means 1 on the CPU (on a few
    shared cores, threads spinning on busy cores make these small ops many times slower, as the test
    suite's conftest notes) and torch's setting elsewhere. The CPU paths run one thread per worker,
    as DataLoader workers do.
    """
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads is not None or device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        return _rates(device, image_size, batch, workers, seconds, num_local_crops, seed)
    finally:
        torch.set_num_threads(previous)


def _rates(
    device: torch.device,
    image_size: int,
    batch: int,
    workers: int,
    seconds: float,
    num_local_crops: int,
    seed: int,
) -> dict[str, float | int | str]:
    recipe = multi_crop(num_local_crops)
    height, width = source_shape(image_size)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(DISTINCT_IMAGES, height, width, 3), dtype=np.uint8)
    source = _CycledSource(ArraySource(pixels, np.zeros(DISTINCT_IMAGES)), 10**9)
    cpu_transform = build_view_transform(recipe, image_size, IMAGENET_MEAN, IMAGENET_STD)
    canvas = ImageCanvas(canvas_size_for(image_size))
    torch.manual_seed(seed)
    cpu = _loader_rate(TransformDataset(source, cpu_transform), batch, workers, seconds)
    canvas_rate = _loader_rate(TransformDataset(source, canvas), batch, workers, seconds)

    augmenter = BatchViewAugmenter(cpu_transform).to(device)
    images, sizes = torch.utils.data.default_collate([canvas(source.load(i)) for i in range(batch)])
    batched = _batched_rate(augmenter, images.to(device), sizes.to(device), seconds, seed)
    return {
        "views": recipe.describe(image_size),
        "device": str(device),
        "image_size": image_size,
        "batch": batch,
        "workers": workers,
        "source": f"{height}x{width}",
        "cpu": cpu,
        "canvas": canvas_rate,
        "batched": batched,
    }


def markdown_table(rates: dict[str, float | int | str]) -> str:
    """The rates as a small markdown table, with a line naming the settings."""
    loader = f"DataLoader, {rates['workers']} workers"
    rows = [
        (f"CPU recipe ({loader})", rates["cpu"]),
        (f"canvas only: shrink + pad ({loader})", rates["canvas"]),
        (f"batched on {rates['device']}", rates["batched"]),
    ]
    lines = [
        f"DINO multi-crop {rates['views']}, batch {rates['batch']}, source images {rates['source']}",
        "",
        "| path | images/s | ms per image |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rate:,.0f} | {1000 / rate:.3f} |" for name, rate in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the CPU paths")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per path")
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--threads", type=int, help="batched path's torch threads (default: 1 on the CPU)")
    args = parser.parse_args(argv)
    settings = (args.device, args.image_size, args.batch, args.workers, args.seconds, args.local_crops)
    rates = augmentation_rates(*settings, threads=args.threads)
    print(markdown_table(rates))


if __name__ == "__main__":
    main()
