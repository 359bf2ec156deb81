"""Datasets: where images come from, decoupled from how they are augmented.

An ``ImageSource`` only yields RGB PIL images and integer labels, so every method sees the same pixels
whatever the on-disk format (packaged npz, CIFAR-10 zip, ImageFolder tree, torchvision batches), and
augmentations stay the method's business through ``TransformDataset``.
"""

from __future__ import annotations

import functools
import io
import re
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
from sslbench.data.image_files import (
    IMAGE_EXTENSIONS,
    SKIP_HINT,
    BadImageError,
    FileSource,
    check_policy,
    drop_unreadable,
    read_rgb,
    warn_skipped,
)

DATASET_CHOICES: tuple[str, ...] = ("embedded", "cifar10", "imagefolder:PATH")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_FILE = "cifar10_subset.npz"
CIFAR10_DEFAULT_ROOTS = ("./data/cifar10", "./data/cifar10.zip", "~/.cache/sslbench/cifar10")
_ZIP_MEMBER = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/[^/]+$")


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
    name: str
    train: ImageSource
    test: ImageSource
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    skipped_images: int = 0  # unreadable files dropped under bad_images=skip (train and test together)

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


def _scan_split(split_dir: Path, classes: list[str]) -> FileSource:
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


def _folder_splits(root: Path, layout: str, bad_images: str) -> tuple[FileSource, FileSource, list[str], int]:
    """Read ``root/train/<class>`` and ``root/{val|test}/<class>``; errors say where and what layout.

    Under ``bad_images="skip"`` unreadable files are dropped (and counted, the last item) before the
    checks that every class still has images.
    """
    where = f"expected {layout}"
    if not root.is_dir():
        raise SSLBenchError(f"{root}: no such folder; {where}")
    train_dir = root / "train"
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ or test/"
        raise SSLBenchError(f"{root}: no {missing} folder; {where}")
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise SSLBenchError(f"{train_dir}: no class folders; {where}")
    extra = sorted({p.name for p in _class_dirs(eval_dir)} - set(classes))
    if extra:
        raise SSLBenchError(f"{eval_dir}: classes {extra} are not in {train_dir} (classes: {classes})")
    train, test = _scan_split(train_dir, classes), _scan_split(eval_dir, classes)
    skipped: list[tuple[str, str]] = []
    if bad_images == "skip":
        (train, skipped_train), (test, skipped_test) = drop_unreadable(train), drop_unreadable(test)
        skipped = skipped_train + skipped_test
        warn_skipped(skipped, len(train) + len(test) + len(skipped))
    images = f"{'readable ' if skipped else ''}images ({', '.join(IMAGE_EXTENSIONS)})"
    empty = [cls for label, cls in enumerate(classes) if not np.any(train.labels == label)]
    if empty:
        raise SSLBenchError(f"{train_dir}: class folders {empty} hold no {images}")
    if len(test) == 0:
        raise SSLBenchError(f"{eval_dir}: no {images}; {where}")
    return train, test, classes, len(skipped)


def _skipped_note(skipped: int) -> str:
    return f", {skipped} unreadable skipped" if skipped else ""


def _load_imagefolder(path: str, image_size: int | None, bad_images: str) -> DatasetSplits:
    if not path:
        raise SSLBenchError("imagefolder needs a path: use --dataset imagefolder:PATH")
    root = Path(path).expanduser().resolve()
    layout = "PATH/train/<class>/*.jpg and PATH/val/<class>/ (or PATH/test/<class>/)"
    train, test, classes, skipped = _folder_splits(root, layout, bad_images)
    eval_name = "val" if (root / "val").is_dir() else "test"
    counts = f"{len(classes)} classes, {len(train)} train / {len(test)} {eval_name}{_skipped_note(skipped)}"
    return DatasetSplits(
        f"imagefolder:{root}", train, test, classes, image_size or 224, IMAGENET_MEAN, IMAGENET_STD,
        f"ImageFolder {root} ({counts})", skipped,
    )  # fmt: skip


def _decode_member(blob: bytes, name: str) -> np.ndarray:
    arr = np.asarray(read_rgb(io.BytesIO(blob), name, SKIP_HINT), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise SSLBenchError(f"{name}: expected a 32x32 CIFAR-10 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


ZipSplits = tuple[ArraySource, ArraySource, list[str], list[tuple[str, str]]]


@functools.lru_cache(maxsize=1)
def _cifar10_zip(path: Path, stamp: tuple[float, int], bad_images: str) -> ZipSplits | None:
    """Decode every member once (cached while the file is unchanged); ``None`` when it holds no images.

    Under ``bad_images="skip"`` a member that does not decode is left out and listed (the last item).
    """
    members: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                match = _ZIP_MEMBER.match(name)
                if match and name.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in name:
                    members[match[1]].append((match[2], name))
            blobs = {name: zf.read(name) for split in members.values() for _, name in split}
    except (OSError, zipfile.BadZipFile) as exc:
        raise SSLBenchError(f"{path}: not a readable zip ({exc})") from exc
    if not members["train"] or not members["test"]:
        return None
    classes = sorted({cls for cls, _ in members["train"]})
    extra = sorted({cls for cls, _ in members["test"]} - set(classes))
    if extra:
        raise SSLBenchError(f"{path}: test classes {extra} are not among the train classes {classes}")
    index = {cls: i for i, cls in enumerate(classes)}
    sources = []
    skipped: list[tuple[str, str]] = []
    for split in ("train", "test"):
        images, labels = [], []
        for cls, name in members[split]:
            try:
                images.append(_decode_member(blobs[name], f"{path}:{name}"))
            except BadImageError as exc:
                if bad_images != "skip":
                    raise
                skipped.append((exc.file, exc.reason))
                continue
            labels.append(index[cls])
        if not images:
            raise SSLBenchError(f"{path}: no readable {split} images (all {len(members[split])} skipped)")
        sources.append(ArraySource(np.stack(images), labels))
    return sources[0], sources[1], classes, skipped


Cifar10Found = tuple[ImageSource, ImageSource, list[str], int, str]  # ..., classes, skipped files, origin


def _cifar10_from(root: Path, download: bool, bad_images: str = "error") -> Cifar10Found | None:
    """Try one candidate root; ``None`` means nothing usable is there (so the next place is tried)."""
    if root.is_file():
        stat = root.stat()
        found = _cifar10_zip(root, (stat.st_mtime, stat.st_size), bad_images)
        if found is None:
            return None
        train, test, classes, skipped = found
        warn_skipped(skipped, len(train) + len(test) + len(skipped))
        return train, test, classes, len(skipped), f"zip {root}"
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        layout = "train/<class>/*.jpg and test/<class>/*.jpg"
        return (*_folder_splits(root, layout, bad_images), f"ImageFolder tree {root}")
    if not download and not (root / "cifar-10-batches-py").is_dir():
        return None
    import torchvision.datasets  # only here: it is slow to import and most runs never need it

    try:
        sets = [torchvision.datasets.CIFAR10(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError) as exc:
        raise SSLBenchError(f"{root}: could not load torchvision CIFAR-10 ({exc})") from exc
    train, test = (ArraySource(np.asarray(s.data, dtype=np.uint8), s.targets) for s in sets)
    return train, test, list(sets[0].classes), 0, f"torchvision folder {root}"


def _load_cifar10(root: str | None, image_size: int | None, download: bool, bad_images: str) -> DatasetSplits:
    candidates = [root] if root is not None else list(CIFAR10_DEFAULT_ROOTS)
    paths = [Path(c).expanduser().resolve() for c in candidates]
    found = None
    looked: list[str] = []
    for path in paths:
        try:
            found = _cifar10_from(path, False, bad_images) if path.exists() else None
        except BadImageError:  # CIFAR-10 is there, but a file of it is damaged: that is the message
            raise
        except SSLBenchError as exc:
            looked.append(f"{path} (unusable: {exc})")
            continue
        if found:
            break
        looked.append(f"{path} ({'no CIFAR-10 data there' if path.exists() else 'missing'})")
    if found is None and download:
        target = paths[0] if root is not None else paths[-1]
        found = _cifar10_from(target, True, bad_images)
    if found is None:
        raise SSLBenchError(
            f"CIFAR-10 not found; looked in: {'; '.join(looked)}. Get it with --download (torchvision, "
            "needs network), or point --data-root PATH at a zip of train/<class>/*.jpg and "
            "test/<class>/*.jpg, an ImageFolder tree with train/ and test/, or a torchvision folder "
            "containing cifar-10-batches-py"
        )
    train, test, classes, skipped, origin = found
    return DatasetSplits(
        "cifar10", train, test, classes, image_size or 32, CIFAR10_MEAN, CIFAR10_STD,
        f"CIFAR-10 ({len(train)} train / {len(test)} test{_skipped_note(skipped)}) from {origin}", skipped,
    )  # fmt: skip


def load_dataset(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    *,
    bad_images: str = "error",
) -> DatasetSplits:
    """Resolve a dataset name (see ``DATASET_CHOICES``) to train/test sources and their statistics.

    ``bad_images`` (``error`` | ``skip``): what an unreadable image file does (``sslbench.data.image_files``).
    """
    check_policy(bad_images)
    if name == "embedded":
        return _load_embedded(image_size)
    if name == "cifar10":
        return _load_cifar10(root, image_size, download, bad_images)
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
