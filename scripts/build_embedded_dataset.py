"""Build the CIFAR-10 subset shipped inside the package, so ``sslbench run`` works offline.

The subset is balanced and reproducible: the first N files per class in sorted filename order, from a zip
laid out as ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``. Class index = position in sorted
class-name order. The npz is written with fixed zip dates so that rebuilding gives a byte-identical file.

    python scripts/build_embedded_dataset.py [--zip PATH] [--out PATH] \
        [--train-per-class 500] [--test-per-class 100]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = REPO.parent / "shared" / "data" / "cifar10.zip"
DEFAULT_OUT = REPO / "sslbench" / "data" / "cifar10_subset.npz"
SPLITS = ("train", "test")
# Key order is fixed: it decides both the file layout and the printed digest.
KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def list_members(zf: zipfile.ZipFile) -> dict[str, dict[str, list[str]]]:
    """Map split -> class -> sorted member names; the sort is what makes the subset reproducible."""
    found: dict[str, dict[str, list[str]]] = {split: defaultdict(list) for split in SPLITS}
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in SPLITS and parts[2].lower().endswith((".jpg", ".jpeg", ".png")):
            found[parts[0]][parts[1]].append(name)
    return {split: {cls: sorted(names) for cls, names in per.items()} for split, per in found.items()}


def decode(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(zf.read(name))) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise SystemExit(f"{name}: expected a 32x32 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def build_arrays(zip_path: Path, train_per_class: int, test_per_class: int) -> dict[str, np.ndarray]:
    """Decode the first ``per_class`` files of every class of each split into uint8 arrays."""
    counts = {"train": train_per_class, "test": test_per_class}
    with zipfile.ZipFile(zip_path) as zf:
        members = list_members(zf)
        classes = sorted(members["train"])
        if not classes:
            raise SystemExit(f"{zip_path}: no train/<class>/*.jpg members")
        if sorted(members["test"]) != classes:
            raise SystemExit(
                f"{zip_path}: test classes {sorted(members['test'])} differ from train {classes}"
            )
        arrays: dict[str, np.ndarray] = {}
        for split in SPLITS:
            images, labels = [], []
            for label, cls in enumerate(classes):
                names = members[split][cls]
                if len(names) < counts[split]:
                    raise SystemExit(
                        f"{zip_path}: {split}/{cls} has {len(names)} images, need {counts[split]}"
                    )
                images += [decode(zf, name) for name in names[: counts[split]]]
                labels += [label] * counts[split]
            arrays[f"{split}_images"] = np.stack(images).astype(np.uint8)
            arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    arrays["classes"] = np.asarray(classes, dtype=str)
    return arrays


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over key, dtype, shape and bytes of every array, in ``KEYS`` order."""
    digest = hashlib.sha256()
    for key in KEYS:
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed member dates, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for key in KEYS:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=FIXED_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=9)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build(zip_path: Path, out_path: Path, train_per_class: int = 500, test_per_class: int = 100) -> str:
    """Build and save the subset; return the arrays' SHA-256."""
    if not zip_path.is_file():
        raise SystemExit(f"{zip_path}: no such zip (pass --zip PATH to a CIFAR-10 jpg zip)")
    if train_per_class < 1 or test_per_class < 1:
        raise SystemExit("--train-per-class and --test-per-class must be at least 1")
    arrays = build_arrays(zip_path, train_per_class, test_per_class)
    save_npz_deterministic(out_path, arrays)
    return arrays_digest(arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help=f"source zip (default {DEFAULT_ZIP})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output npz (default {DEFAULT_OUT})")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    sha = build(args.zip, args.out, args.train_per_class, args.test_per_class)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB) in {time.perf_counter() - start:.1f} s")
    print(f"arrays sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
