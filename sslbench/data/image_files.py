"""Image files on disk: decoding one, and checking many before a run relies on them.

A corrupt file or one that only looks like an image (a text file named ``.jpg``, a cut-off download) is
handled by the ``bad_images`` policy. ``error`` (the default) reads nothing up front: the first load of
the file fails with a message that names it. ``skip`` opens every file once when the dataset is loaded
(the header and what ``verify`` checks, not a full decode), drops the unreadable ones and says so in one
warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sslbench.base.errors import SSLBenchError
from sslbench.data.augment import rgb_image

BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SKIP_HINT = "fix or remove the file, or drop unreadable images with --set bad_images=skip"
# A file that passed the skip check can still hold damaged image data past its header.
CHECKED_HINT = "its header passed the bad_images=skip check but its image data is damaged: fix or remove it"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_CHECK_CHUNK = 256  # files per task: threads hide file-system latency without one future per file
_SHOWN = 3  # unreadable files named in a message


class BadImageError(SSLBenchError):
    """An image file that cannot be decoded: a problem of the data, the same for every pair that reads it."""

    def __init__(self, message: str, file: str = "", reason: str = "") -> None:
        super().__init__(message)  # a loader worker's traceback is stripped by SSLBenchError
        self.file = file
        self.reason = reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # PIL's text repeats the path, or names a BytesIO object
        return "not in an image format PIL can read"
    return str(exc) or type(exc).__name__


def read_rgb(file: str | Path | IO[bytes], name: str | Path, hint: str = "") -> Image.Image:
    """Decode an image file to RGB; an unreadable file is the user's to fix, so say which (and how)."""
    try:
        with Image.open(file) as img:
            img.load()
            return rgb_image(img)
    except _DECODE_ERRORS as exc:
        reason = _reason(exc)
        advice = f"; {hint}" if hint else ""
        raise BadImageError(f"{name}: not a readable image ({reason}){advice}", str(name), reason) from exc


def _ends_with_eoi(handle: IO[bytes]) -> bool:
    """A complete JPEG ends with the end-of-image marker (some writers pad it with zeros)."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - 64))
    return handle.read().rstrip(b"\0").endswith(b"\xff\xd9")


def image_problem(file: str | Path | IO[bytes]) -> str | None:
    """Why the file is not a usable image, or ``None``, at a fraction of the cost of decoding it.

    The header is parsed, then ``verify`` checks what the format allows (a PNG's checksums); a JPEG,
    which ``verify`` does not check, is decoded (at 1/8 scale) only when it lacks its end marker, as a
    cut-off download does.
    """
    try:
        with Image.open(file) as img:
            if img.format == "JPEG" and img.fp is not None:
                if not _ends_with_eoi(img.fp):
                    img.draft(None, (1, 1))
                    img.load()
            else:
                img.verify()
    except Exception as exc:  # PIL raises many types for damaged files; each is a reason to skip one
        return _reason(exc)
    return None


class FileSource:
    """Image files decoded lazily, so arbitrarily large folders cost nothing until read."""

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int] | np.ndarray, hint: str = SKIP_HINT
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.hint = hint
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return read_rgb(self.paths[index], self.paths[index], self.hint)


def _problems(paths: list[Path]) -> list[str | None]:
    return [image_problem(path) for path in paths]


def drop_unreadable(source: FileSource) -> tuple[FileSource, list[tuple[str, str]]]:
    """The source without its unreadable files, and ``(file, reason)`` for each one dropped."""
    chunks = [source.paths[i : i + _CHECK_CHUNK] for i in range(0, len(source.paths), _CHECK_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        problems = [problem for chunk in pool.map(_problems, chunks) for problem in chunk]
    keep = [i for i, problem in enumerate(problems) if problem is None]
    skipped = [(str(path), problem) for path, problem in zip(source.paths, problems, strict=True) if problem]
    kept = FileSource([source.paths[i] for i in keep], source.labels[keep], hint=CHECKED_HINT)
    return kept, skipped


def unreadable_images(source: Any) -> list[tuple[str, str]]:
    """``(file, reason)`` for each image of ``source`` that does not decode. It decodes every image: for
    the small sets an error message asks about, not for a scan of a whole dataset."""
    found = []
    for index in range(len(source)):
        try:
            source.load(index)
        except BadImageError as error:
            found.append((error.file, error.reason))
    return found


def name_files(found: list[tuple[str, str]]) -> str:
    """``file (reason); ...`` for the first few unreadable files, and how many more there are."""
    shown = "; ".join(f"{file} ({reason})" for file, reason in found[:_SHOWN])
    return shown + (f"; and {len(found) - _SHOWN} more" if len(found) > _SHOWN else "")


def warn_skipped(skipped: list[tuple[str, str]], total: int) -> None:
    """One warning for all the files a ``skip`` policy dropped, naming the first few and why."""
    if not skipped:
        return
    count = f"{len(skipped)} unreadable image file(s) of {total}"
    warnings.warn(f"skipped {count} (bad_images=skip): {name_files(skipped)}", stacklevel=3)


def check_policy(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise SSLBenchError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got '{bad_images}'")
