"""Datasets: where images come from, decoupled from how they are augmented.

An ``ImageSource`` only yields RGB PIL images and integer labels, so every method sees the same pixels
whatever the on-disk format (packaged npz, CIFAR zip, ImageFolder tree, torchvision batches, STL-10
binaries), and augmentations stay the method's business through ``TransformDataset``. The datasets known
by name (CIFAR-100, STL-10, Tiny ImageNet, ImageNet-100, ImageNet) live in ``named_datasets``.
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torch.utils.data import DataLoader

from sslbench.base.errors import SSLBenchError, unknown_name_message
from sslbench.base.small_images import SMALL_IMAGE_MAX
from sslbench.data.image_files import (
    IMAGE_EXTENSIONS,
    FileSource,
    check_policy,
    drop_unreadable,
    warn_skipped,
)
from sslbench.data.image_files import read_rgb as read_rgb  # re-exported: evaluation reads it from here

DATASET_CHOICES: tuple[str, ...] = (
    "embedded", "cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet100", "imagenet", "imagefolder:PATH",
)  # fmt: skip
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_FILE = "cifar10_subset.npz"
LARGE_IMAGE_SIZE = 224  # an image folder of images over SMALL_IMAGE_MAX px is trained at this size
SIZE_SAMPLES = 8  # images, spread over the classes, whose headers give an image folder its image size
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageSource(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...


class ArraySource:
    """In-memory uint8 ``(N, H, W, 3)`` images: the fast path for small, fully decoded datasets."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class SubsetSource:
    """A view on some indices of another source, so small presets never copy the data."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(source.labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.source.load(int(self.indices[index]))


class ConcatSource:
    """Sources one after another, copying nothing: STL-10's labelled and unlabelled images for pretraining."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self.sources = list(sources)
        self.labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in self.sources])
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def load(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[part].load(index - int(self.starts[part]))


class TransformDataset(torch.utils.data.Dataset):
    """Pairs a source with a method's transform; the transform may return a list of views."""

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], Any]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.source.load(index)), int(self.source.labels[index])


@dataclass
class DatasetSplits:
    """A dataset's splits. ``train`` is the labelled set the k-NN bank and the linear probe are fitted on;
    ``pretrain`` holds the images self-supervised training sees when they differ from ``train`` (STL-10's
    100,000 unlabelled images with its 5,000 labelled ones), labelled -1 where it carries no labels;
    None: pretraining uses ``train``."""

    name: str
    train: ImageSource
    test: ImageSource
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    skipped_images: int = 0  # unreadable files dropped under bad_images=skip (train and test together)
    pretrain: ImageSource | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def subset_indices(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted indices of up to ``per_class`` random samples of each class; ``None`` keeps all."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    if per_class < 1:
        raise SSLBenchError(f"per-class subset size must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> dict[str, np.ndarray]:
    """Decompress the packaged npz once per process; arrays are read-only because they are shared."""
    try:
        with resources.files("sslbench.data").joinpath(EMBEDDED_FILE).open("rb") as handle:
            data = np.load(io.BytesIO(handle.read()), allow_pickle=False)
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SSLBenchError(
            f"the packaged dataset sslbench/data/{EMBEDDED_FILE} is missing or damaged ({exc}); "
            "reinstall sslbench or rebuild it with scripts/build_embedded_dataset.py"
        ) from exc
    for arr in arrays.values():
        arr.flags.writeable = False
    return arrays


def _load_embedded(image_size: int | None) -> DatasetSplits:
    arrays = _embedded_arrays()
    classes = [str(c) for c in arrays["classes"]]
    train = ArraySource(arrays["train_images"], arrays["train_labels"])
    test = ArraySource(arrays["test_images"], arrays["test_labels"])
    per_train, per_test = len(train) // len(classes), len(test) // len(classes)
    return DatasetSplits(
        "embedded", train, test, classes, image_size or 32, CIFAR10_MEAN, CIFAR10_STD,
        f"CIFAR-10 subset ({per_train}/{per_test} per class), embedded",
    )  # fmt: skip


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(split_dir: Path, classes: list[str]) -> FileSource:
    """The image files under ``split_dir/<class>/`` (at any depth), labelled by their class's index."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        if (split_dir / cls).is_dir():
            found = sorted(
                p
                for p in (split_dir / cls).rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            paths += found
            labels += [label] * len(found)
    return FileSource(paths, labels)


def first_few(names: Sequence[str], shown: int = 5) -> str:
    """``a, b, c and 7 more``: enough names to find the problem, on one line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def empty_classes(labels: np.ndarray, classes: Sequence[str]) -> list[str]:
    """The classes without an image: a probe or k-NN over them would be silently wrong."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return [cls for cls, count in zip(classes, counts, strict=False) if count == 0]


def drop_bad_images(sources: list[FileSource], bad_images: str) -> tuple[list[FileSource], int]:
    """Under ``bad_images="skip"`` the sources without their unreadable files (one warning names them)
    and how many went; under ``error`` the sources as they are (a bad file fails when it is read)."""
    if bad_images != "skip":
        return sources, 0
    checked = [drop_unreadable(source) for source in sources]
    skipped = [item for _, dropped in checked for item in dropped]
    kept = [source for source, _ in checked]
    warn_skipped(skipped, sum(len(source) for source in kept) + len(skipped))
    return kept, len(skipped)


def folder_splits(
    root: Path, layout: str, bad_images: str, classes: Sequence[str] | None = None
) -> tuple[FileSource, FileSource, list[str], int]:
    """Read ``root/train/<class>`` and ``root/{val|test}/<class>``; errors say where and what layout.

    ``classes`` None: every class folder of train/ (val/ may hold no other); given: exactly those, each
    needed in both splits (ImageNet-100 read from a whole ImageNet tree). Under ``bad_images="skip"``
    unreadable files are dropped (and counted, the last item) before the checks that every class still
    has images.
    """
    where = f"expected {layout}"
    if not root.is_dir():
        raise SSLBenchError(f"{root}: no such folder; {where}")
    train_dir = root / "train"
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ or test/"
        raise SSLBenchError(f"{root}: no {missing} folder; {where}")
    if classes is None:
        classes = [p.name for p in _class_dirs(train_dir)]
        if not classes:
            raise SSLBenchError(f"{train_dir}: no class folders; {where}")
        extra = sorted({p.name for p in _class_dirs(eval_dir)} - set(classes))
        if extra:
            raise SSLBenchError(f"{eval_dir}: classes {extra} are not in {train_dir} (classes: {classes})")
    else:
        classes = list(classes)
        for split_dir in (train_dir, eval_dir):
            absent = [cls for cls in classes if not (split_dir / cls).is_dir()]
            if absent:
                count = f"{len(absent)} of the {len(classes)} class folders"
                raise SSLBenchError(f"{split_dir}: {count} are missing ({first_few(absent)}); {where}")
    scanned = [scan_split(train_dir, classes), scan_split(eval_dir, classes)]
    (train, test), skipped = drop_bad_images(scanned, bad_images)
    images = f"{'readable ' if skipped else ''}images ({', '.join(IMAGE_EXTENSIONS)})"
    empty = empty_classes(train.labels, classes)
    if empty:
        raise SSLBenchError(f"{train_dir}: class folders {empty} hold no {images}")
    if len(test) == 0:
        raise SSLBenchError(f"{eval_dir}: no {images}; {where}")
    return train, test, classes, skipped


def skipped_note(skipped: int) -> str:
    return f", {skipped} unreadable skipped" if skipped else ""


def largest_side(paths: Sequence[Path], samples: int = SIZE_SAMPLES) -> int | None:
    """The largest side among a few images spread over ``paths`` (sorted by class), read from their
    headers alone; None when none of them opens (the bad_images policy deals with such files later)."""
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(samples, len(paths))).round().astype(int))
    sides = []
    for index in picks:
        try:
            with Image.open(paths[index]) as img:
                sides.append(max(img.size))
        except _HEADER_ERRORS:
            continue
    return max(sides) if sides else None


def folder_image_size(paths: Sequence[Path], requested: int | None) -> tuple[int, str]:
    """The image size of an image folder and why: as set, else the images' own when they are small (so
    64 px images are not blown up to 224 px and get the small-image recipes), else 224 px."""
    if requested is not None:
        return requested, f"image size {requested} px, as set"
    side = largest_side(paths)
    if side is not None and side <= SMALL_IMAGE_MAX:
        return side, f"image size {side} px, the images' own"
    seen = f"images up to {side} px" if side else "no image header readable"
    return LARGE_IMAGE_SIZE, f"image size {LARGE_IMAGE_SIZE} px ({seen}, over {SMALL_IMAGE_MAX} px)"


def _load_imagefolder(path: str, image_size: int | None, bad_images: str) -> DatasetSplits:
    if not path:
        raise SSLBenchError("imagefolder needs a path: use --dataset imagefolder:PATH")
    root = Path(path).expanduser().resolve()
    layout = "PATH/train/<class>/*.jpg and PATH/val/<class>/ (or PATH/test/<class>/)"
    train, test, classes, skipped = folder_splits(root, layout, bad_images)
    eval_name = "val" if (root / "val").is_dir() else "test"
    counts = f"{len(classes)} classes, {len(train)} train / {len(test)} {eval_name}{skipped_note(skipped)}"
    size, why = folder_image_size(train.paths, image_size)
    return DatasetSplits(
        f"imagefolder:{root}", train, test, classes, size, IMAGENET_MEAN, IMAGENET_STD,
        f"ImageFolder {root} ({counts}; {why})", skipped,
    )  # fmt: skip


def load_dataset(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    *,
    bad_images: str = "error",
) -> DatasetSplits:
    """Resolve a dataset name (see ``DATASET_CHOICES``) to its splits and their statistics.

    ``root`` (``--data-root``): where a named dataset is; None looks in its default places.
    ``image_size`` None: the dataset's own. ``download``: let torchvision fetch CIFAR-10/100.
    ``bad_images`` (``error`` | ``skip``): what an unreadable image file does (``sslbench.data.image_files``).
    """
    check_policy(bad_images)
    # Imported here: the named loaders build on the types above, so the module cannot load before them.
    from sslbench.data.named_datasets import NAMED_DATASETS

    if name == "embedded":
        return _load_embedded(image_size)
    if name in NAMED_DATASETS:
        return NAMED_DATASETS[name](root, image_size, download, bad_images)
    if name.startswith("imagefolder:"):
        return _load_imagefolder(name.split(":", 1)[1], image_size, bad_images)
    if name == "imagefolder":
        return _load_imagefolder(root or "", image_size, bad_images)
    raise SSLBenchError(unknown_name_message("dataset", name, DATASET_CHOICES))


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    device: torch.device,
    drop_last: bool,
) -> DataLoader:
    """Seeded shuffling, so one config gives one data order; pinned memory only where it helps (CUDA)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
