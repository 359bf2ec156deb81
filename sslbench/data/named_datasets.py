"""The datasets known by name: CIFAR-10/100, STL-10, Tiny ImageNet, ImageNet-100 and ImageNet.

Each is read from ``--data-root`` or, without one, from its default places in turn (``./data/<name>``,
then ``~/.cache/sslbench/<name>``); when none holds it, the one-line error lists every place and what was
wrong there, and how to get the data.
"""

from __future__ import annotations

import functools
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from sslbench.base.errors import SSLBenchError
from sslbench.data.dataset_search import candidate_paths, default_roots, search_places
from sslbench.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArraySource,
    DatasetSplits,
    ImageSource,
    drop_bad_images,
    empty_classes,
    first_few,
    folder_splits,
    scan_split,
    skipped_note,
)
from sslbench.data.image_files import (
    IMAGE_EXTENSIONS,
    SKIP_HINT,
    BadImageError,
    FileSource,
    read_rgb,
    warn_skipped,
)
from sslbench.data.stl10 import load_stl10

Found = TypeVar("Found")
# (root, image_size, download, bad_images) -> splits, as load_dataset passes them on
Loader = Callable[[str | None, int | None, bool, str], DatasetSplits]
FileSplits = tuple[FileSource, FileSource, list[str], int]  # train, test, classes, unreadable files skipped


TINYIMAGENET_DEFAULT_ROOTS = default_roots("tinyimagenet", "tiny-imagenet-200")
IMAGENET100_DEFAULT_ROOTS = default_roots("imagenet100", "imagenet")  # a whole ImageNet holds ImageNet-100
IMAGENET_DEFAULT_ROOTS = default_roots("imagenet")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The 100 classes of CMC (Tian et al. 2019, arXiv 1906.05849), in the order of github:HobbitLong/CMC
# imagenet100.txt; labels follow the sorted wnids, as an ImageFolder of the subset gives them.
IMAGENET100_WNIDS = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)  # fmt: skip
IMAGENET_LAYOUT = (
    "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (validation images in class folders)"
)
TINYIMAGENET_LAYOUT = (
    "<root>/tiny-imagenet-200/ (or <root>/) holding wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG and val/val_annotations.txt"
)
IMAGENET100_LAYOUT = f"{IMAGENET_LAYOUT}, for the 100 classes of CMC's imagenet100.txt"
NO_IMAGENET_DOWNLOAD = "--download cannot fetch ImageNet: it needs an image-net.org account"
_ZIP_MEMBER = re.compile(r"^(?:.*/)?(train|test)/([^/]+)/[^/]+$")


# --- CIFAR-10 and CIFAR-100 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarKind:
    """What tells CIFAR-10 from CIFAR-100 (fine labels): one loader reads both in every layout."""

    name: str
    title: str
    batches_folder: str  # torchvision's folder of pickled batches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def default_roots(self) -> tuple[str, ...]:
        return (f"./data/{self.name}", f"./data/{self.name}.zip", f"~/.cache/sslbench/{self.name}")


CIFAR10 = CifarKind("cifar10", "CIFAR-10", "cifar-10-batches-py", CIFAR10_MEAN, CIFAR10_STD)
CIFAR100 = CifarKind("cifar100", "CIFAR-100", "cifar-100-python", CIFAR100_MEAN, CIFAR100_STD)
CifarFound = tuple[ImageSource, ImageSource, list[str], int, str]  # ..., classes, skipped files, origin
ZipSplits = tuple[ArraySource, ArraySource, list[str], list[tuple[str, str]]]


def _decode_member(blob: bytes, name: str, title: str) -> np.ndarray:
    arr = np.asarray(read_rgb(io.BytesIO(blob), name, SKIP_HINT), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise SSLBenchError(f"{name}: expected a 32x32 {title} image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


@functools.lru_cache(maxsize=1)
def _cifar_zip(path: Path, stamp: tuple[float, int], bad_images: str, title: str) -> ZipSplits | None:
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
                images.append(_decode_member(blobs[name], f"{path}:{name}", title))
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


def _cifar_from(kind: CifarKind, root: Path, download: bool, bad_images: str) -> CifarFound | None:
    """Try one candidate root; ``None`` means nothing usable is there (so the next place is tried)."""
    if root.is_file():
        stat = root.stat()
        found = _cifar_zip(root, (stat.st_mtime, stat.st_size), bad_images, kind.title)
        if found is None:
            return None
        train, test, classes, skipped = found
        warn_skipped(skipped, len(train) + len(test) + len(skipped))
        return train, test, classes, len(skipped), f"zip {root}"
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        layout = "train/<class>/*.jpg and test/<class>/*.jpg"
        return (*folder_splits(root, layout, bad_images), f"ImageFolder tree {root}")
    if not download and not (root / kind.batches_folder).is_dir():
        return None
    import torchvision.datasets  # only here: it is slow to import and most runs never need it

    dataset_class = getattr(torchvision.datasets, kind.name.upper())  # CIFAR10 or CIFAR100
    try:
        sets = [dataset_class(str(root), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as exc:
        raise SSLBenchError(f"{root}: could not load torchvision {kind.title} ({exc})") from exc
    train, test = (ArraySource(np.asarray(s.data, dtype=np.uint8), s.targets) for s in sets)
    return train, test, list(sets[0].classes), 0, f"torchvision folder {root}"


def load_cifar(
    kind: CifarKind, root: str | None, image_size: int | None, download: bool, bad_images: str
) -> DatasetSplits:
    """CIFAR-10 or -100 from a zip, an ImageFolder tree or torchvision's folder (downloaded on request)."""
    paths = candidate_paths(root, kind.default_roots)
    found, looked = search_places(paths, lambda path: _cifar_from(kind, path, False, bad_images), kind.title)
    if found is None and download:
        target = paths[0] if root is not None else paths[-1]
        fetched = _cifar_from(kind, target, True, bad_images)
        found = (fetched, target) if fetched else None
    if found is None:
        raise SSLBenchError(
            f"{kind.title} not found; looked in: {'; '.join(looked)}. Get it with --download (torchvision, "
            "needs network), or point --data-root PATH at a zip of train/<class>/*.jpg and "
            "test/<class>/*.jpg, an ImageFolder tree with train/ and test/, or a torchvision folder "
            f"containing {kind.batches_folder}"
        )
    (train, test, classes, skipped, origin), _ = found
    return DatasetSplits(
        kind.name, train, test, classes, image_size or 32, kind.mean, kind.std,
        f"{kind.title} ({len(train)} train / {len(test)} test{skipped_note(skipped)}) from {origin}", skipped,
    )  # fmt: skip


# --- Tiny ImageNet, ImageNet-100, ImageNet ------------------------------------------------------------------


def _tinyimagenet_val(folder: Path, classes: list[str], where: str) -> FileSource:
    """val/images/<file>, labelled by val/val_annotations.txt (``file<TAB>wnid<TAB>box``)."""
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise SSLBenchError(f"{folder / 'val'}: no val_annotations.txt; {where}")
    index = {wnid: label for label, wnid in enumerate(classes)}
    rows = [line.split("\t") for line in annotations.read_text(errors="replace").splitlines() if line.strip()]
    unknown = [row[0] for row in rows if len(row) < 2 or row[1].strip() not in index]
    if unknown:
        raise SSLBenchError(
            f"{annotations}: {len(unknown)} line(s) without a 'file<TAB>wnid' of wnids.txt "
            f"({first_few(unknown)}); {where}"
        )
    paths = [folder / "val" / "images" / row[0].strip() for row in rows]
    absent = [path.name for path in paths if not path.is_file()]
    if absent:
        listed = f"{len(absent)} of the {len(paths)} images val_annotations.txt lists are missing"
        raise SSLBenchError(f"{folder / 'val' / 'images'}: {listed} ({first_few(absent)}); {where}")
    return FileSource(paths, [index[row[1].strip()] for row in rows])


def _tinyimagenet_from(root: Path, bad_images: str) -> FileSplits:
    folder = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    where = f"expected {TINYIMAGENET_LAYOUT}"
    if not (folder / "wnids.txt").is_file():
        raise SSLBenchError(f"{folder}: no wnids.txt; {where}")
    classes = sorted({line.strip() for line in (folder / "wnids.txt").read_text().splitlines()} - {""})
    absent = [wnid for wnid in classes if not (folder / "train" / wnid / "images").is_dir()]
    if absent:
        count = f"{len(absent)} of the {len(classes)} classes of wnids.txt have no <wnid>/images/ folder"
        raise SSLBenchError(f"{folder / 'train'}: {count} ({first_few(absent)}); {where}")
    val = _tinyimagenet_val(folder, classes, where)
    (train, test), skipped = drop_bad_images([scan_split(folder / "train", classes), val], bad_images)
    empty = empty_classes(train.labels, classes)
    if empty:
        raise SSLBenchError(f"{folder / 'train'}: no readable images for {first_few(empty)}; {where}")
    if len(test) == 0:
        raise SSLBenchError(f"{folder / 'val' / 'images'}: no readable images; {where}")
    return train, test, classes, skipped


@dataclass(frozen=True)
class FileDataset:
    """An image-file dataset known by name, normalised with ImageNet's statistics; wnids as class names."""

    name: str
    title: str
    image_size: int
    default_roots: tuple[str, ...]
    probe: Callable[..., FileSplits]  # (root, bad_images=...): the splits; SSLBenchError when unusable
    how: str  # how to get it, for the not-found error


def load_files(
    spec: FileDataset, root: str | None, image_size: int | None, download: bool, bad_images: str
) -> DatasetSplits:
    """Search --data-root or the default places for ``spec``'s data, and describe what was found."""
    probe = functools.partial(spec.probe, bad_images=bad_images)
    found, looked = search_places(candidate_paths(root, spec.default_roots), probe, spec.title)
    if found is None:
        raise SSLBenchError(f"{spec.title} not found; looked in: {'; '.join(looked)}. {spec.how}")
    (train, test, classes, skipped), path = found
    counts = f"{len(classes)} classes, {len(train)} train / {len(test)} val{skipped_note(skipped)}"
    return DatasetSplits(
        spec.name, train, test, classes, image_size or spec.image_size, IMAGENET_MEAN, IMAGENET_STD,
        f"{spec.title} ({counts}) from {path}", skipped,
    )  # fmt: skip


# Tiny ImageNet (CS231n): 200 classes of 64 px images, 100,000 train / 10,000 val.
TINYIMAGENET = FileDataset(
    "tinyimagenet", "Tiny ImageNet", 64, TINYIMAGENET_DEFAULT_ROOTS, _tinyimagenet_from,
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip (--download does not fetch it), unzip it and "
    f"point --data-root at it: {TINYIMAGENET_LAYOUT}",
)  # fmt: skip
# ImageNet-100: CMC's 100 classes, from a tree of just those or from a whole ImageNet.
IMAGENET100 = FileDataset(
    "imagenet100", "ImageNet-100", 224, IMAGENET100_DEFAULT_ROOTS,
    functools.partial(folder_splits, layout=IMAGENET100_LAYOUT, classes=sorted(IMAGENET100_WNIDS)),
    f"Point --data-root at a tree of {IMAGENET100_LAYOUT} (a whole ImageNet will do); {NO_IMAGENET_DOWNLOAD}",
)  # fmt: skip
# ImageNet-1k (ILSVRC-2012), the validation images sorted into class folders as for torchvision's ImageFolder.
IMAGENET = FileDataset(
    "imagenet", "ImageNet", 224, IMAGENET_DEFAULT_ROOTS,
    functools.partial(folder_splits, layout=IMAGENET_LAYOUT),
    f"Point --data-root at {IMAGENET_LAYOUT}; {NO_IMAGENET_DOWNLOAD}",
)  # fmt: skip
NAMED_DATASETS: dict[str, Loader] = {
    "cifar10": functools.partial(load_cifar, CIFAR10),
    "cifar100": functools.partial(load_cifar, CIFAR100),
    "stl10": load_stl10,
    **{spec.name: functools.partial(load_files, spec) for spec in (TINYIMAGENET, IMAGENET100, IMAGENET)},
}
