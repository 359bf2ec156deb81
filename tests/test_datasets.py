"""Datasets: the packaged subset, every CIFAR-10 layout, ImageFolder trees and their error messages."""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from sslbench.base.errors import SSLBenchError
from sslbench.data.datasets import (
    DATASET_CHOICES,
    ArraySource,
    FileSource,
    SubsetSource,
    TransformDataset,
    load_dataset,
    subset_indices,
)
from sslbench.data.image_files import BadImageError, image_problem

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "cifar10.zip"
needs_zip = pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} not available")


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_embedded_dataset", REPO / "scripts" / "build_embedded_dataset.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(mode: str, size: tuple[int, int] = (32, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb.convert("RGBA") if mode == "RGBA" else rgb.convert(mode)


def _tree(root: Path, splits: dict[str, dict[str, int]], size: tuple[int, int] = (32, 32)) -> Path:
    """Write ``root/<split>/<class>/<i>.png`` with ``count`` images per class."""
    for split, per_class in splits.items():
        for cls, count in per_class.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _image("RGB", size, seed=i).save(root / split / cls / f"{i:02d}.png")
    return root


# ------------------------------------------------------------------------------------------------ embedded
def test_embedded_is_balanced_cifar_subset() -> None:
    ds = load_dataset("embedded", root="/ignored")
    assert (len(ds.train), len(ds.test), ds.num_classes) == (5000, 1000, 10)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.classes[-1] == "truck"
    assert np.bincount(ds.train.labels).tolist() == [500] * 10
    assert np.bincount(ds.test.labels).tolist() == [100] * 10
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape == (5000, 32, 32, 3)
    assert ds.image_size == 32 and ds.mean == (0.4914, 0.4822, 0.4465) and "embedded" in ds.description
    img = ds.train.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert load_dataset("embedded").train.images is ds.train.images  # decoded once per process


@needs_zip
def test_build_script_is_reproducible(tmp_path: Path) -> None:
    script = _build_script()
    shas = [script.build(SHARED_ZIP, tmp_path / f"{i}.npz", 3, 1) for i in range(2)]
    assert shas[0] == shas[1]
    assert (tmp_path / "0.npz").read_bytes() == (tmp_path / "1.npz").read_bytes()
    with np.load(tmp_path / "0.npz") as data:
        assert data["train_images"].shape == (30, 32, 32, 3) and data["test_images"].shape == (10, 32, 32, 3)
        assert data["train_labels"].tolist() == [c for c in range(10) for _ in range(3)]
        assert data["classes"].tolist() == load_dataset("embedded").classes


@needs_zip
def test_packaged_file_matches_first_sorted_zip_files() -> None:
    ds = load_dataset("embedded")
    with zipfile.ZipFile(SHARED_ZIP) as zf:
        first: dict[str, str] = {}
        for name in sorted(zf.namelist()):
            if name.endswith(".jpg"):
                first.setdefault(name.rsplit("/", 1)[0], name)
        for split, source, per_class in (("train", ds.train, 500), ("test", ds.test, 100)):
            for label, cls in enumerate(ds.classes):
                expected = np.asarray(Image.open(io.BytesIO(zf.read(first[f"{split}/{cls}"]))).convert("RGB"))
                np.testing.assert_array_equal(source.images[label * per_class], expected)


# ------------------------------------------------------------------------------------------------- cifar10
def test_cifar10_from_zip(tmp_path: Path) -> None:
    zip_path = tmp_path / "c10.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for split, count in (("train", 3), ("test", 2)):
            for c, cls in enumerate(("cat", "airplane")):
                for i in range(count):
                    buf = io.BytesIO()
                    _image("RGB", seed=10 * c + i).save(buf, format="PNG")
                    zf.writestr(f"{split}/{cls}/{i:04d}.png", buf.getvalue())
    ds = load_dataset("cifar10", root=str(zip_path))
    assert ds.classes == ["airplane", "cat"] and (len(ds.train), len(ds.test)) == (6, 4)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(np.asarray(ds.train.load(3)), np.asarray(_image("RGB", seed=0)))
    assert ds.image_size == 32 and "zip" in ds.description


def test_cifar10_from_imagefolder_tree_converts_modes_to_rgb(tmp_path: Path) -> None:
    root = _tree(tmp_path / "c10", {"train": {"bird": 2, "frog": 2}, "test": {"bird": 1, "frog": 1}})
    odd = {"l.png": "L", "rgba.png": "RGBA", "p.png": "P", "cmyk.jpg": "CMYK", "la.png": "LA"}
    for name, mode in odd.items():
        _image(mode, seed=7).save(root / "train" / "frog" / name)
    _image("P", seed=8).save(root / "train" / "frog" / "p_alpha.png", transparency=0)
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(root / "train" / "frog" / "i16.png")
    odd.update({"p_alpha.png": "P", "i16.png": "I;16"})
    ds = load_dataset("cifar10", root=str(root))
    assert ds.classes == ["bird", "frog"] and len(ds.train) == 4 + len(odd) and len(ds.test) == 2
    assert isinstance(ds.train, FileSource)
    for i in range(len(ds.train)):
        img = ds.train.load(i)
        assert img.mode == "RGB" and img.size == (32, 32)
    i16 = [p.name for p in ds.train.paths].index("i16.png")
    assert np.asarray(ds.train.load(i16))[0, 0].tolist() == [40000 >> 8] * 3


def test_cifar10_torchvision_format_and_download_pass_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real batches are checksummed by torchvision, so its loader is stood in for here."""
    import torchvision.datasets

    calls: list[tuple[str, bool, bool]] = []

    class FakeCIFAR10:
        classes = ["airplane", "automobile"]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            n = 4 if train else 2
            self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    ds = load_dataset("cifar10", root=str(tmp_path / "tv"))
    assert (len(ds.train), len(ds.test), ds.classes) == (4, 2, ["airplane", "automobile"])
    assert "torchvision" in ds.description and not any(download for *_, download in calls)
    calls.clear()
    load_dataset("cifar10", root=str(tmp_path / "fresh"), download=True)
    assert calls == [(str(tmp_path / "fresh"), True, True), (str(tmp_path / "fresh"), False, True)]


def test_cifar10_missing_lists_every_place_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data" / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)  # present but unusable
    with pytest.raises(SSLBenchError) as err:
        load_dataset("cifar10")
    msg = str(err.value)
    for place in ("data/cifar10", "data/cifar10.zip", ".cache/sslbench/cifar10", "--download", "--data-root"):
        assert place in msg
    with pytest.raises(SSLBenchError, match="nowhere"):
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))


def test_cifar10_empty_tree_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(SSLBenchError, match="--data-root") as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert str(tmp_path / "train") in str(err.value)


# --------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_with_val(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": {"b": 2, "a": 3}, "val": {"a": 1}}, size=(40, 30))
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.classes == ["a", "b"] and (len(ds.train), len(ds.test)) == (5, 1)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1] and ds.test.labels.tolist() == [0]
    assert ds.image_size == 40 and ds.mean == (0.485, 0.456, 0.406) and ds.name.startswith("imagefolder:")
    assert ds.train.load(0).size == (40, 30)
    assert load_dataset(f"imagefolder:{root}", image_size=64).image_size == 64


def test_imagefolder_uppercase_extension_and_test_split(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "x").mkdir(parents=True)
        _image("RGB").save(tmp_path / split / "x" / "A.JPEG", format="JPEG")
    (tmp_path / "train" / "x" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert (len(ds.train), len(ds.test)) == (1, 1)


@pytest.mark.parametrize("case", ["missing_root", "missing_train", "missing_val", "no_classes", "no_images"])
def test_imagefolder_errors_name_the_path(tmp_path: Path, case: str) -> None:
    root = tmp_path / "ds"
    looked_at = root
    if case != "missing_root":
        root.mkdir()
    if case in ("missing_val", "no_classes", "no_images"):
        (root / "train").mkdir()
    if case in ("missing_train", "no_classes", "no_images"):
        (root / "val").mkdir()
    if case == "no_classes":
        looked_at = root / "train"
    if case == "no_images":
        (root / "train" / "cls").mkdir()
        looked_at = root / "train"
    with pytest.raises(SSLBenchError) as err:
        load_dataset(f"imagefolder:{root}")
    assert str(looked_at) in str(err.value)


def test_imagefolder_test_classes_must_be_subset(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(SSLBenchError, match="zebra"):
        load_dataset(f"imagefolder:{root}")


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    bad = root / "train" / "a" / "x.jpg"
    bad.write_bytes(b"\x00garbage" * 10)
    ds = load_dataset(f"imagefolder:{root}")
    index = [p.name for p in ds.train.paths].index("x.jpg")
    with pytest.raises(SSLBenchError, match="not a readable image") as err:
        ds.train.load(index)
    assert str(bad) in str(err.value)
    assert "--set bad_images=skip" in str(err.value)


def test_corrupt_file_read_in_a_loader_worker_keeps_its_one_line_message(tmp_path: Path) -> None:
    """A worker's error comes back as ``type(text with the worker's traceback)``: the message survives."""
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    loader = torch.utils.data.DataLoader(TransformDataset(FileSource([bad], [0]), np.asarray), num_workers=1)
    with pytest.raises(BadImageError) as err:
        next(iter(loader))
    assert str(err.value) == (
        f"{bad}: not a readable image (not in an image format PIL can read); fix or remove the file, or drop "
        "unreadable images with --set bad_images=skip"
    )


def _jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    _image("RGB", (size, size)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    _image("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


CHECKED = {
    "jpeg": (lambda: _jpeg(), None),
    "jpeg padded with zeros": (lambda: _jpeg() + bytes(16), None),
    "jpeg with trailing data": (lambda: _jpeg() + b"a phone's video" * 100, None),
    "jpeg cut off": (lambda: _jpeg()[: len(_jpeg()) * 2 // 3], "image file is truncated"),
    "jpeg header only": (lambda: _jpeg()[:100], "Truncated File Read"),
    "png": (_png_bytes, None),
    "png cut off": (lambda: _png_bytes()[:200], "Truncated File Read"),
    "png bad checksum": (lambda: _png_bytes()[:100] + b"x" + _png_bytes()[101:], "broken PNG file"),
    "text": (lambda: b"hello", "not in an image format PIL can read"),
    "empty": (lambda: b"", "not in an image format PIL can read"),
}


@pytest.mark.parametrize("case", list(CHECKED))
def test_image_check_catches_damage_without_decoding_good_files(tmp_path: Path, case: str) -> None:
    make, problem = CHECKED[case]
    path = tmp_path / "x.jpg"
    path.write_bytes(make())
    found = image_problem(path)
    assert found == problem if problem is None else problem in found
    assert image_problem(io.BytesIO(make())) == found


def test_skip_needs_a_known_policy() -> None:
    with pytest.raises(SSLBenchError, match="bad_images must be one of error, skip, got 'ignore'"):
        load_dataset("embedded", bad_images="ignore")


# ------------------------------------------------------------------------------------------------- helpers
def test_unknown_name_suggests_and_lists() -> None:
    with pytest.raises(SSLBenchError) as err:
        load_dataset("cifar01")
    msg = str(err.value)
    assert "did you mean 'cifar10'" in msg
    assert all(name in msg for name in DATASET_CHOICES)


def test_subset_indices_balanced_reproducible_sorted() -> None:
    labels = np.repeat(np.arange(4), [10, 7, 3, 12])
    idx = subset_indices(labels, 5, seed=1)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 5, 3, 5]
    np.testing.assert_array_equal(idx, subset_indices(labels, 5, seed=1))
    assert not np.array_equal(idx, subset_indices(labels, 5, seed=2))
    np.testing.assert_array_equal(subset_indices(labels, None, seed=0), np.arange(len(labels)))
    with pytest.raises(SSLBenchError):
        subset_indices(labels, 0, seed=0)


def test_subset_source_and_transform_dataset() -> None:
    images = np.stack([np.full((8, 8, 3), i, dtype=np.uint8) for i in range(6)])
    source = ArraySource(images, [0, 1, 2, 0, 1, 2])
    sub = SubsetSource(source, [1, 4])
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1]
    assert np.asarray(sub.load(1))[0, 0, 0] == 4
    views = TransformDataset(sub, lambda img: [np.asarray(img), np.asarray(img)])
    out, label = views[0]
    assert isinstance(label, int) and label == 1 and len(out) == 2 and out[0][0, 0, 0] == 1
