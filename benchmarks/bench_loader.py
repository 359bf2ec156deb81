"""The loader per core: DINO's views at 224 px from JPEG files, sslbench beside lightly, one thread.

What a data-loader worker does for one image, in images per second on one core (so 16 workers on 16
cores make 16x that, the rate a GPU is fed at):

- ``sslbench cpu recipe``: ``FileSource.load`` (decode) + ``build_view_transform(multi_crop(10), 224)``,
  2x224 + 10x96 normalised tensors: ``--augment-on cpu``, the default;
- ``lightly DINOTransform``: ``Image.open(...).convert("RGB")`` + lightly's ``DINOTransform`` (its
  defaults: 2x224 + 6x96; ``n_local_views=10`` here, so the same 12 views), if lightly is installed;
- ``sslbench canvas``: ``FileSource.load`` + ``ImageCanvas(256)``: all the loader does for
  ``--augment-on gpu`` (the views are made on the device).

The files are photographs from the embedded CIFAR-10 subset, enlarged to 500x375 (the commonest
ImageNet shape) with mild sensor-like noise so that they decode like camera JPEGs (quality 90, about
the size of an ImageNet file: the table prints the mean). Every path reads the same files in the same
order, interleaved in rounds (a shared machine's load hits all alike); the rate is the median round.

Run: ``python benchmarks/bench_loader.py [--images 64] [--rounds 5] [--profile]``; ``--profile`` adds
the time of each step of the CPU recipe (decode, crop, jitter, blur, ...), per image.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from sslbench.data.augment import build_view_transform, multi_crop
from sslbench.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from sslbench.data.image_canvas import ImageCanvas, canvas_size_for
from sslbench.data.image_files import FileSource

VIEW_SIZE = 224
LOCAL_CROPS = 10
SHAPE = (500, 375)  # (width, height)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 500x375 JPEGs (quality 90) made from the embedded CIFAR-10 photographs."""
    rng = np.random.default_rng(seed)
    source = load_dataset("embedded").train
    paths = []
    for i in range(count):
        small = source.load(int(rng.integers(len(source))))
        large = np.asarray(small.resize(SHAPE, Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(large + rng.normal(0.0, 16.0, large.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def loaders(paths: list[Path]) -> dict[str, Callable[[int], Any]]:
    """What one worker runs per image, by name."""
    files = FileSource(paths, np.zeros(len(paths), dtype=np.int64))
    recipe = build_view_transform(multi_crop(LOCAL_CROPS), VIEW_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    canvas = ImageCanvas(canvas_size_for(VIEW_SIZE))
    paths_by_name = {
        "sslbench cpu recipe": lambda i: recipe(files.load(i)),
        "sslbench canvas (--augment-on gpu)": lambda i: canvas(files.load(i)),
    }
    try:
        from lightly.transforms import DINOTransform
    except ImportError:
        print("lightly is not installed (pip install lightly): its column is left out")
        return paths_by_name
    lightly_transform = DINOTransform(n_local_views=LOCAL_CROPS)

    def lightly_views(i: int) -> Any:
        with Image.open(paths[i]) as image:
            return lightly_transform(image.convert("RGB"))

    return {"lightly DINOTransform": lightly_views, **paths_by_name}


def rates(paths: list[Path], rounds: int) -> dict[str, float]:
    """Median images/s per path over ``rounds`` rounds, each path reading every file once per round."""
    work = loaders(paths)
    for run in work.values():  # warm-up: imports, first allocations
        run(0)
    per_round: dict[str, list[float]] = {name: [] for name in work}
    for r in range(rounds):
        names = list(work) if r % 2 == 0 else list(reversed(work))
        for name in names:
            start = time.perf_counter()
            for i in range(len(paths)):
                work[name](i)
            per_round[name].append(len(paths) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in per_round.items()}


def _step_name(step: Any) -> str:
    inner = getattr(step, "transforms", None)
    if isinstance(step, T.Compose):
        return " + ".join(_step_name(s) for s in inner)
    if isinstance(step, T.RandomApply):
        return _step_name(inner[0])
    return type(step).__name__


def profile_recipe(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image in each step of the CPU recipe (all 12 views), decode included."""
    files = FileSource(paths, np.zeros(len(paths), dtype=np.int64))
    recipe = build_view_transform(multi_crop(LOCAL_CROPS), VIEW_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    spent: dict[str, float] = {"decode": 0.0}

    def timed(step: Callable, name: str) -> Callable:
        def run(image: Any) -> Any:
            start = time.perf_counter()
            out = step(image)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out

        return run

    for pipeline in [*recipe.global_views, recipe.local_view]:
        pipeline.transforms = [timed(step, _step_name(step)) for step in pipeline.transforms]
    for i in range(len(paths)):
        start = time.perf_counter()
        image = files.load(i)
        spent["decode"] += time.perf_counter() - start
        recipe(image)
    return {name: 1000 * seconds / len(paths) for name, seconds in spent.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG files read per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also time each step of the CPU recipe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, as one data-loader worker
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        kib = statistics.mean(p.stat().st_size for p in paths) / 1024
        print(f"{args.images} JPEGs, {SHAPE[0]}x{SHAPE[1]}, mean {kib:.0f} KiB; DINO views 2x224 + 10x96")
        result = rates(paths, args.rounds)
        lightly_rate = result.get("lightly DINOTransform")
        print("\n| loader, one core | images/s | vs lightly |\n|---|---:|---:|")
        for name, rate in result.items():
            ratio = f"{rate / lightly_rate:.2f}" if lightly_rate else "-"
            print(f"| {name} | {rate:.1f} | {ratio} |")
        if args.profile:
            print("\n| CPU recipe step | ms per image (12 views) |\n|---|---:|")
            for name, ms in profile_recipe(paths).items():
                print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
