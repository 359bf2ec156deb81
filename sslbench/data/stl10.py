"""STL-10 (Coates, Ng & Lee 2011) in torchvision's binary layout, read through a memory map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sslbench.base.errors import SSLBenchError
from sslbench.data.dataset_search import candidate_paths, default_roots, search_places
from sslbench.data.datasets import ConcatSource, DatasetSplits

STL10_DEFAULT_ROOTS = default_roots("stl10")
# solo-learn normalises STL-10 with CIFAR-10's statistics (solo/data/pretrain_dataloader.py MEANS_N_STD,
# classification_dataloader.py stl_pipeline); W-MSE (htdt/self-supervised datasets/stl10.py) uses
# (0.43, 0.42, 0.39) / (0.27, 0.26, 0.27). The solo-learn values are kept.
STL10_MEAN = (0.4914, 0.4823, 0.4466)
STL10_STD = (0.247, 0.243, 0.261)
STL10_SIDE = 96
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt")
STL10_LAYOUT = f"<root>/stl10_binary/ holding {', '.join(STL10_FILES)} (as torchvision's STL10 unpacks it)"
_STL10_RECORD = 3 * STL10_SIDE * STL10_SIDE  # bytes per image


class STL10BinarySource:
    """The images of one STL-10 ``*_X.bin`` file, read one at a time through ``np.memmap``.

    Each record is a uint8 (3, 96, 96) image with every channel stored column-major (torchvision's
    ``STL10.__loadfile`` reshapes to (-1, 3, 96, 96) and swaps the last two axes); the 100,000 unlabelled
    images are 2.7 GB, so nothing is read whole, and a pickled copy (a loader worker) reopens the file.
    """

    def __init__(self, path: Path, labels: np.ndarray) -> None:
        self.path = path
        self.labels = np.asarray(labels, dtype=np.int64)
        self._records: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        if self._records is None:
            shape = (len(self.labels), 3, STL10_SIDE, STL10_SIDE)
            self._records = np.memmap(self.path, dtype=np.uint8, mode="r", shape=shape)
        channel_width_height = self._records[index]
        return Image.fromarray(np.ascontiguousarray(channel_width_height.transpose(2, 1, 0)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_records": None}  # a pickled memmap would carry its whole file


def _stl10_count(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % _STL10_RECORD:
        whole = f"a whole number of 96x96 RGB images ({_STL10_RECORD} bytes each)"
        raise SSLBenchError(f"{path}: {size} bytes is not {whole}; expected {STL10_LAYOUT}")
    return size // _STL10_RECORD


def _stl10_labels(path: Path, count: int, classes: list[str]) -> np.ndarray:
    """One byte per image, 1..10 on disk; 0..9 here, as torchvision gives them."""
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != count:
        raise SSLBenchError(f"{path}: {len(labels)} labels for the {count} images of its _X.bin file")
    if labels.min() < 1 or labels.max() > len(classes):
        valid = f"1..{len(classes)} (the lines of class_names.txt)"
        raise SSLBenchError(f"{path}: labels {labels.min()}..{labels.max()}, expected {valid}")
    return labels - 1


def _stl10_from(root: Path) -> tuple[STL10BinarySource, STL10BinarySource, STL10BinarySource, list[str]]:
    """Train, test and unlabelled images of ``root/stl10_binary`` (or of root itself), and the class names."""
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    absent = [name for name in STL10_FILES if not (folder / name).is_file()]
    if absent:
        raise SSLBenchError(f"{folder}: no {', '.join(absent)}; expected {STL10_LAYOUT}")
    names = (folder / "class_names.txt").read_text(errors="replace").splitlines()
    classes = [name.strip() for name in names if name.strip()]
    images = {split: folder / f"{split}_X.bin" for split in ("train", "test", "unlabeled")}
    counts = {split: _stl10_count(path) for split, path in images.items()}
    labels = {
        split: _stl10_labels(folder / f"{split}_y.bin", counts[split], classes) for split in ("train", "test")
    }
    labels["unlabeled"] = np.full(counts["unlabeled"], -1)
    train, test, unlabeled = (STL10BinarySource(images[split], labels[split]) for split in images)
    return train, test, unlabeled, classes


def load_stl10(root: str | None, image_size: int | None, download: bool, bad_images: str) -> DatasetSplits:
    """STL-10 (Coates et al. 2011): 5,000 labelled train and 8,000 test images of 10 classes at 96 px.

    Pretraining sees the labelled and the 100,000 unlabelled images together, as solo-learn
    (solo/data/pretrain_dataloader.py, split "train+unlabeled") and W-MSE (datasets/stl10.py) train,
    all labelled -1 (pretraining uses no labels); the k-NN bank and the linear probe use the 5,000
    labelled ones. Neither ``download`` (torchvision's STL10(root, download=True) fetches the data) nor
    ``bad_images`` (the files hold decoded pixels) applies.
    """
    found, looked = search_places(candidate_paths(root, STL10_DEFAULT_ROOTS), _stl10_from, "STL-10")
    if found is None:
        get = "torchvision.datasets.STL10(ROOT, download=True) fetches it (2.5 GB)"
        raise SSLBenchError(
            f"STL-10 not found; looked in: {'; '.join(looked)}. Point --data-root at {STL10_LAYOUT}; {get}"
        )
    (train, test, unlabeled, classes), _ = found
    train_unlabelled = STL10BinarySource(train.path, np.full(len(train), -1))
    counts = f"{len(train)} + {len(unlabeled)} unlabelled to pretrain, {len(train)} train / {len(test)} test"
    return DatasetSplits(
        "stl10", train, test, classes, image_size or STL10_SIDE, STL10_MEAN, STL10_STD,
        f"STL-10 ({counts}) from {train.path.parent}", pretrain=ConcatSource([train_unlabelled, unlabeled]),
    )  # fmt: skip
