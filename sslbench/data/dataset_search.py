"""Where a named dataset is looked for, and the one-line account of every place looked at."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sslbench.base.errors import SSLBenchError
from sslbench.data.image_files import BadImageError

Found = TypeVar("Found")


def default_roots(*names: str) -> tuple[str, ...]:
    """Where a dataset is looked for without --data-root: ./data, then the user's cache."""
    return tuple(place for name in names for place in (f"./data/{name}", f"~/.cache/sslbench/{name}"))


def candidate_paths(root: str | None, defaults: Sequence[str]) -> list[Path]:
    return [Path(place).expanduser().resolve() for place in ([root] if root is not None else defaults)]


def search_places(
    paths: list[Path], probe: Callable[[Path], Found | None], title: str
) -> tuple[tuple[Found, Path] | None, list[str]]:
    """The first place the probe finds the data, and what each place looked at held (for the error).

    A probe returns None when nothing of the dataset is there and raises ``SSLBenchError`` when it is there
    but unusable; a damaged image is the user's to fix whatever the other places hold, so it is raised.
    """
    looked: list[str] = []
    for path in paths:
        if not path.exists():
            looked.append(f"{path} (missing)")
            continue
        try:
            found = probe(path)
        except BadImageError:
            raise
        except SSLBenchError as exc:
            looked.append(f"{path} (unusable: {exc})")
            continue
        if found is not None:
            return (found, path), looked
        looked.append(f"{path} (no {title} data there)")
    return None, looked
