"""Checkpoints that continue a pair's training exactly where it stopped.

A checkpoint holds everything the next iteration depends on: the method's weights and buffers (student,
teacher, DINO's center, BatchNorm statistics), the optimizer state, the position in the schedules, the
random generators (torch, CUDA, numpy, python, and the GPU augmentation's), the metrics so far, and the
hash of the config that made it. The data order and the views need no state of their own: they are
drawn from (seed, epoch, image) (``sslbench.data.sampling``), so the position is enough. bf16 training uses
no gradient scaler, so there is none to save.

Files are written atomically (temporary file, fsync, rename) as ``checkpoints/iter-<N>.pt``; the newest
``keep`` are kept. They hold tensors, numbers, strings, lists and dicts only, and are read with
``torch.load(weights_only=True)``, which never runs code from a file. A newest checkpoint that cannot be
read (a truncated file) gives a warning and the previous one is used.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslbench.base.atomic_io import atomic_path

FORMAT = 1
FOLDER = "checkpoints"


def rng_state(augment_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every generator training draws from, as plain tensors, numbers and lists."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": [version, list(internal), gauss_next],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "augment": augment_generator.get_state() if augment_generator is not None else None,
    }
    return state


def restore_rng_state(state: dict[str, Any], augment_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    if augment_generator is not None and state["augment"] is not None:
        augment_generator.set_state(state["augment"])


def _iteration(path: Path) -> int:
    return int(path.stem.split("-")[1])


def checkpoint_files(pair_dir: Path) -> list[Path]:
    """The pair's checkpoints, oldest first."""
    folder = pair_dir / FOLDER
    if not folder.is_dir():
        return []
    return sorted(folder.glob("iter-*.pt"), key=_iteration)


def save_checkpoint(pair_dir: Path, payload: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` atomically as the newest checkpoint and drop all but the newest ``keep``."""
    iteration = payload["iteration"]
    path = pair_dir / FOLDER / f"iter-{iteration:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    older = []
    for existing in checkpoint_files(pair_dir):
        if _iteration(existing) > iteration:  # from before a resume that could not use it: stale
            existing.unlink(missing_ok=True)
        else:
            older.append(existing)
    for old in older[: -max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(pair_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The newest readable checkpoint made under ``config_hash``, or None.

    An unreadable one (truncated by a crash of the machine, say) is skipped with a warning naming it; one
    made under another config is never used.
    """
    for path in reversed(checkpoint_files(pair_dir)):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated zip, a short read: the file is unusable, whatever the cause
            warnings.warn(
                f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
                "falling back to the previous one",
                stacklevel=2,
            )
            continue
        if payload.get("format") != FORMAT or payload.get("config_hash") != config_hash:
            warnings.warn(f"checkpoint {path} was made by another config or version; not used", stacklevel=2)
            continue
        return payload
    return None
