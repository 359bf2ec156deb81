"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file under results/ goes through here: write to a temporary file in the same folder, flush and
fsync it, then ``os.replace`` it over the target (atomic on POSIX and Windows). A full disk or quota is
the user's to fix, so it becomes one ``SSLBenchError`` that names the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sslbench.base.errors import SSLBenchError

FULL_DISK_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)
# torch.save's C++ writer reports a full disk as a RuntimeError without an errno: a failed write that
# leaves less than this free on the file system is taken for one.
NEARLY_FULL_BYTES = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _full_disk(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    if not isinstance(error, OSError | RuntimeError):
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def full_disk_message(path: Path, error: BaseException) -> str:
    quota = isinstance(error, OSError) and error.errno == getattr(errno, "EDQUOT", None)
    problem = "disk quota exceeded" if quota else "no space left on the device"
    return (
        f"{problem} while writing {path}: free some space or write elsewhere (--out); "
        "the previous version of the file, if any, is unchanged"
    )


def make_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """``mkdir -p``, with one clear message where it cannot be made (a file in the way, no permission)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:
        raise SSLBenchError(
            f"{what} {folder} is a file, not a folder: give a folder (made if missing)"
        ) from error
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SSLBenchError(f"cannot make the {what} {folder} ({reason}): give another one") from error
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; it replaces ``path`` only if the block succeeds.

    The temporary file is removed whatever happens; a full disk (or quota) raises ``SSLBenchError``.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared like any file
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except (OSError, RuntimeError) as error:
        if not _full_disk(error, target.parent):
            raise
        raise SSLBenchError(full_disk_message(target, error)) from error
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
