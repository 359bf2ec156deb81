"""Datasets by name: a tiny copy of each in its exact on-disk layout, read back, and its layout errors."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslbench.base.errors import SSLBenchError
from sslbench.data.datasets import DATASET_CHOICES, load_dataset
from sslbench.data.named_datasets import IMAGENET100_WNIDS, NAMED_DATASETS
from sslbench.data.stl10 import STL10_FILES

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _pixels(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random (H, W, 3) image: not symmetric, so a swapped axis shows."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _solid_jpeg(path: Path, colour: int, size: int = 8) -> None:
    """A one-colour JPEG: it decodes to (nearly) its colour, which names the class it was written for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (colour, 255 - colour, colour // 2)).save(path, format="JPEG", quality=95)


def _colour_of(image: Image.Image) -> int:
    return int(round(float(np.asarray(image)[..., 0].mean())))


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder and home, so the default places hold nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# ------------------------------------------------------------------------------------------------ names
def test_every_name_is_listed_and_an_unknown_one_lists_them() -> None:
    assert set(DATASET_CHOICES) == {"embedded", "imagefolder:PATH", *NAMED_DATASETS}
    with pytest.raises(SSLBenchError) as err:
        load_dataset("stl-10")
    message = str(err.value)
    assert "unknown dataset 'stl-10' (did you mean 'stl10'?)" in message and "\n" not in message
    assert all(name in message for name in DATASET_CHOICES)


# ----------------------------------------------------------------------------------------------- cifar100
def test_cifar100_from_zip(tmp_path: Path) -> None:
    archive = tmp_path / "c100.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split, count in (("train", 2), ("test", 1)):
            for c, cls in enumerate(("maple_tree", "apple", "whale")):
                for i in range(count):
                    buffer = io.BytesIO()
                    Image.fromarray(_pixels(10 * c + i)).save(buffer, format="PNG")
                    zf.writestr(f"cifar100/{split}/{cls}/{i:04d}.png", buffer.getvalue())
    data = load_dataset("cifar100", root=str(archive))
    assert data.name == "cifar100" and data.classes == ["apple", "maple_tree", "whale"]
    assert (len(data.train), len(data.test)) == (6, 3) and data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(np.asarray(data.train.load(2)), _pixels(0))  # maple_tree/0000.png
    assert data.image_size == 32 and data.mean == (0.5071, 0.4865, 0.4409) and data.std[2] == 0.2762
    assert data.description.startswith("CIFAR-100 (6 train / 3 test) from zip") and data.pretrain is None


def test_cifar100_torchvision_folder_has_100_fine_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision checksums the real batches, so its loader is stood in for; the fine labels are its own."""
    import torchvision.datasets

    class FakeCIFAR100:
        classes = [f"fine{i:02d}" for i in range(100)]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.data = np.zeros((200 if train else 100, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 100 for i in range(len(self.data))]

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    (tmp_path / "tv" / "cifar-100-python").mkdir(parents=True)
    data = load_dataset("cifar100", root=str(tmp_path / "tv"))
    assert data.num_classes == 100 and (len(data.train), len(data.test)) == (200, 100)
    assert data.train.labels.max() == 99 and "torchvision folder" in data.description


def test_cifar100_missing_says_where_it_looked(nowhere: Path) -> None:
    (nowhere / "data" / "cifar-10-batches-py").mkdir(parents=True)  # CIFAR-10 is no CIFAR-100
    with pytest.raises(SSLBenchError) as err:
        load_dataset("cifar100")
    message = str(err.value)
    assert message.startswith("CIFAR-100 not found; looked in: ")
    for place in (
        "data/cifar100 (missing)",
        "data/cifar100.zip",
        ".cache/sslbench/cifar100",
        "cifar-100-python",
    ):
        assert place in message


# -------------------------------------------------------------------------------------------------- stl10
def _stl_binary(folder: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[np.ndarray]]:
    """STL-10's binaries: (3, 96, 96) records with each channel column-major, labels 1..10 as bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[np.ndarray]] = {}
    for split, count in counts.items():
        images[split] = [_pixels(seed + 100 * len(images) + i, (96, 96)) for i in range(count)]
        records = b"".join(image.transpose(2, 1, 0).tobytes() for image in images[split])
        (folder / f"{split}_X.bin").write_bytes(records)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(bytes((i * 3) % 10 + 1 for i in range(count)))
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    return images


def test_stl10_reads_the_column_major_records_and_pretrains_on_unlabelled_too(tmp_path: Path) -> None:
    written = _stl_binary(tmp_path / "stl10_binary", {"train": 3, "test": 2, "unlabeled": 4})
    data = load_dataset("stl10", root=str(tmp_path))
    assert data.classes == STL_CLASSES and data.image_size == 96 and data.mean == (0.4914, 0.4823, 0.4466)
    assert (len(data.train), len(data.test)) == (3, 2)
    assert data.train.labels.tolist() == [0, 3, 6] and data.test.labels.tolist() == [0, 3]
    for split, source in (("train", data.train), ("test", data.test)):
        for index, image in enumerate(written[split]):
            assert source.load(index).size == (96, 96)
            np.testing.assert_array_equal(np.asarray(source.load(index)), image)
    pretrain = data.pretrain  # train + unlabelled, as solo-learn pretrains; no labels
    assert pretrain is not None and len(pretrain) == 7 and pretrain.labels.tolist() == [-1] * 7
    assert data.train.labels.tolist() == [0, 3, 6]  # the labelled view keeps its labels
    np.testing.assert_array_equal(np.asarray(pretrain.load(1)), written["train"][1])
    np.testing.assert_array_equal(np.asarray(pretrain.load(6)), written["unlabeled"][3])
    assert "3 + 4 unlabelled to pretrain, 3 train / 2 test" in data.description
    with pytest.raises(IndexError):
        pretrain.load(7)


def test_stl10_matches_torchvisions_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pixels and labels as torchvision's STL10 (its checksum check stood in for)."""
    import torchvision.datasets

    _stl_binary(tmp_path / "stl10_binary", {"train": 2, "test": 2, "unlabeled": 3}, seed=7)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    data = load_dataset("stl10", root=str(tmp_path / "stl10_binary"))  # the binary folder itself will do
    for split, source in (("train+unlabeled", data.pretrain), ("train", data.train), ("test", data.test)):
        reference = torchvision.datasets.STL10(str(tmp_path), split=split)
        assert source is not None and len(reference) == len(source)
        if split != "train+unlabeled":  # pretraining drops the labels
            assert reference.labels.tolist() == source.labels.tolist()
        for index in range(len(reference)):
            np.testing.assert_array_equal(np.asarray(reference[index][0]), np.asarray(source.load(index)))


def test_stl10_source_pickles_without_its_pixels(tmp_path: Path) -> None:
    written = _stl_binary(tmp_path / "stl10_binary", {"train": 2, "test": 1, "unlabeled": 8})
    unlabeled = load_dataset("stl10", root=str(tmp_path)).pretrain.sources[1]
    unlabeled.load(0)  # the file is open now
    copy = pickle.loads(pickle.dumps(unlabeled))
    assert len(pickle.dumps(unlabeled)) < 3 * 96 * 96
    np.testing.assert_array_equal(np.asarray(copy.load(5)), written["unlabeled"][5])


@pytest.mark.parametrize("damage", ["missing", "cut", "labels_count", "labels_range", "no_folder"])
def test_stl10_wrong_layout_is_one_line_naming_the_problem(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "stl10_binary"
    _stl_binary(folder, {"train": 2, "test": 1, "unlabeled": 2})
    expected = {
        "missing": "no unlabeled_X.bin",
        "cut": f"{folder / 'test_X.bin'}: 27000 bytes is not a whole number of 96x96 RGB images",
        "labels_count": f"{folder / 'train_y.bin'}: 3 labels for the 2 images",
        "labels_range": f"{folder / 'test_y.bin'}: labels 0..0, expected 1..10",
        "no_folder": "no train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt",
    }[damage]
    if damage == "missing":
        (folder / "unlabeled_X.bin").unlink()
    elif damage == "cut":
        (folder / "test_X.bin").write_bytes((folder / "test_X.bin").read_bytes()[:27000])
    elif damage == "labels_count":
        (folder / "train_y.bin").write_bytes(b"\x01\x02\x03")
    elif damage == "labels_range":
        (folder / "test_y.bin").write_bytes(b"\x00")
    else:
        folder.rename(tmp_path / "elsewhere")
    with pytest.raises(SSLBenchError) as err:
        load_dataset("stl10", root=str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"STL-10 not found; looked in: {tmp_path} (unusable: ") and "\n" not in message
    assert expected in message
    assert "<root>/stl10_binary/ holding " + ", ".join(STL10_FILES) in message


def test_stl10_default_places(nowhere: Path) -> None:
    with pytest.raises(SSLBenchError) as err:
        load_dataset("stl10")
    assert "data/stl10 (missing)" in str(err.value) and ".cache/sslbench/stl10 (missing)" in str(err.value)
    _stl_binary(nowhere / "home" / ".cache" / "sslbench" / "stl10" / "stl10_binary", {"train": 1, "test": 1,
                "unlabeled": 1})  # fmt: skip
    assert len(load_dataset("stl10").train) == 1


# ------------------------------------------------------------------------------------------- tinyimagenet
TINY_WNIDS = ["n03444034", "n01443537", "n02085620"]  # wnids.txt is not sorted; labels follow sorted wnids


def _tiny(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    annotations = []
    for wnid in TINY_WNIDS:
        colour = 40 + 80 * sorted(TINY_WNIDS).index(wnid)
        for i in range(2):
            _solid_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t8\t8\n")
        name = f"val_{len(annotations)}.JPEG"
        _solid_jpeg(folder / "val" / "images" / name, colour)
        annotations.append(f"{name}\t{wnid}\t0\t0\t8\t8")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return folder


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    for root in (tmp_path, folder):  # the folder holding tiny-imagenet-200/, or that folder itself
        data = load_dataset("tinyimagenet", root=str(root))
        assert (
            data.classes == sorted(TINY_WNIDS)
            and data.image_size == 64
            and data.mean == (0.485, 0.456, 0.406)
        )
        assert (len(data.train), len(data.test)) == (6, 3) and data.train.labels.tolist() == [
            0,
            0,
            1,
            1,
            2,
            2,
        ]
        assert data.test.labels.tolist() == [2, 0, 1]  # val_0 is of n03444034, the last sorted wnid
        for source in (data.train, data.test):
            for index, label in enumerate(source.labels):
                assert abs(_colour_of(source.load(index)) - (40 + 80 * label)) <= 3
        assert data.description.startswith("Tiny ImageNet (3 classes, 6 train / 3 val) from ")


def test_tinyimagenet_skips_unreadable_images(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    (folder / "train" / TINY_WNIDS[0] / "images" / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_dataset("tinyimagenet", root=str(tmp_path), bad_images="skip")
    assert data.skipped_images == 1 and len(data.train) == 6


@pytest.mark.parametrize("damage", ["wnids", "train_class", "annotations", "val_image", "unknown_wnid"])
def test_tinyimagenet_errors_name_the_missing_piece(tmp_path: Path, damage: str) -> None:
    folder = _tiny(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    if damage == "wnids":
        (folder / "wnids.txt").unlink()
        expected = f"{folder}: no wnids.txt"
    elif damage == "train_class":
        for image in (folder / "train" / "n02085620" / "images").iterdir():
            image.unlink()
        (folder / "train" / "n02085620" / "images").rmdir()
        expected = (
            f"{folder / 'train'}: 1 of the 3 classes of wnids.txt have no <wnid>/images/ folder (n02085620)"
        )
    elif damage == "annotations":
        annotations.unlink()
        expected = f"{folder / 'val'}: no val_annotations.txt"
    elif damage == "val_image":
        (folder / "val" / "images" / "val_1.JPEG").unlink()
        expected = "1 of the 3 images val_annotations.txt lists are missing (val_1.JPEG)"
    else:
        annotations.write_text(annotations.read_text() + "val_9.JPEG\tn09999999\t0\t0\t8\t8\n")
        expected = f"{annotations}: 1 line(s) without a 'file<TAB>wnid' of wnids.txt (val_9.JPEG)"
    with pytest.raises(SSLBenchError) as err:
        load_dataset("tinyimagenet", root=str(tmp_path))
    message = str(err.value)
    assert expected in message and "\n" not in message and "val/val_annotations.txt" in message


# -------------------------------------------------------------------------------------------- imagenet100
def test_imagenet100_wnids_are_cmcs_100() -> None:
    assert len(IMAGENET100_WNIDS) == len(set(IMAGENET100_WNIDS)) == 100
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in IMAGENET100_WNIDS)
    assert IMAGENET100_WNIDS[:3] == ("n02869837", "n01749939", "n02488291")  # imagenet100.txt's first lines


def _imagenet_tree(root: Path, wnids: list[str]) -> None:
    for split in ("train", "val"):
        for wnid in wnids:
            _solid_jpeg(root / split / wnid / f"{wnid}_0.JPEG", 100, size=4)


def test_imagenet100_reads_its_classes_from_a_whole_imagenet(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path, [*IMAGENET100_WNIDS, "n09999999"])  # one class outside the subset
    data = load_dataset("imagenet100", root=str(tmp_path))
    assert data.classes == sorted(IMAGENET100_WNIDS) and data.image_size == 224
    assert (len(data.train), len(data.test)) == (100, 100) and data.train.labels.tolist() == list(range(100))
    assert all(
        path.parent.name == data.classes[label]
        for path, label in zip(data.train.paths, data.train.labels, strict=True)
    )
    assert data.description.startswith("ImageNet-100 (100 classes, 100 train / 100 val) from ")


def test_imagenet100_names_the_first_missing_classes(tmp_path: Path) -> None:
    wnids = sorted(IMAGENET100_WNIDS)
    _imagenet_tree(tmp_path, wnids[7:])
    with pytest.raises(SSLBenchError) as err:
        load_dataset("imagenet100", root=str(tmp_path))
    message = str(err.value)
    assert (
        f"{tmp_path / 'train'}: 7 of the 100 class folders are missing ({', '.join(wnids[:5])} and 2 more)"
        in message
    )
    assert "CMC's imagenet100.txt" in message and "image-net.org" in message


# ----------------------------------------------------------------------------------------------- imagenet
def test_imagenet_tree_and_where_it_looked(tmp_path: Path, nowhere: Path) -> None:
    _imagenet_tree(tmp_path / "data" / "imagenet", ["n01440764", "n01443537"])
    data = load_dataset("imagenet")  # found in ./data/imagenet
    assert (
        data.classes == ["n01440764", "n01443537"]
        and data.image_size == 224
        and data.std == (0.229, 0.224, 0.225)
    )
    assert (len(data.train), len(data.test)) == (2, 2) and data.test.labels.tolist() == [0, 1]
    assert load_dataset("imagenet", image_size=160).image_size == 160
    with pytest.raises(SSLBenchError) as err:
        load_dataset("imagenet", root=str(tmp_path / "nothing"))
    message = str(err.value)
    assert message.startswith(
        f"ImageNet not found; looked in: {tmp_path / 'nothing'} (missing). Point --data-root"
    )
    assert "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG" in message


def test_imagenet_without_val_says_so(tmp_path: Path) -> None:
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(
        SSLBenchError, match=re.escape(f"{tmp_path} (unusable: {tmp_path}: no val/ or test/ folder")
    ):
        load_dataset("imagenet", root=str(tmp_path))


# ------------------------------------------------------------------------------------ imagefolder size
def _folder(root: Path, sizes: list[tuple[int, int]]) -> str:
    for split in ("train", "val"):
        for i, size in enumerate(sizes):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pixels(i, size)).save(root / split / f"c{i % 2}" / f"{i}.png")
    return f"imagefolder:{root}"


def test_imagefolder_of_small_images_keeps_their_size(tmp_path: Path) -> None:
    data = load_dataset(_folder(tmp_path, [(48, 40), (40, 48), (32, 32)]))
    assert data.image_size == 48 and "image size 48 px, the images' own" in data.description


def test_imagefolder_of_large_images_is_224(tmp_path: Path) -> None:
    data = load_dataset(_folder(tmp_path, [(32, 32), (80, 70), (32, 32)]))
    assert data.image_size == 224 and "image size 224 px (images up to 80 px, over 64 px)" in data.description


def test_imagefolder_size_as_set_and_unreadable_headers_ignored(tmp_path: Path) -> None:
    spec = _folder(tmp_path, [(20, 20), (20, 20)])
    assert load_dataset(spec, image_size=96).image_size == 96
    assert "image size 96 px, as set" in load_dataset(spec, image_size=96).description
    (tmp_path / "train" / "c0" / "broken.png").write_bytes(b"not a png")
    assert load_dataset(spec).image_size == 20


@pytest.mark.parametrize("name", sorted(NAMED_DATASETS))
def test_every_named_dataset_says_where_it_looked(name: str, tmp_path: Path) -> None:
    """Each registered dataset, pointed at an empty folder, refuses in one line that names the folder:
    a dataset added to the registry is held to it the day it lands."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SSLBenchError) as refused:
        load_dataset(name, root=str(empty))
    message = str(refused.value)
    assert str(empty) in message and "\n" not in message
