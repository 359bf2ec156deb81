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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sslbench.base.atomic_io import atomic_path
from sslbench.base.collectives import any_rank, gather_objects, on_main
from sslbench.training.interrupt import RunInterrupted, agreed_stop

if TYPE_CHECKING:
    from sslbench.method import Method
    from sslbench.training.state import TrainState

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


@dataclass
class Checkpointing:
    """Where and when a pair's checkpoints go, and whether to continue from the newest one.

    ``enabled=False`` (a loop run outside a run folder, as tests do) never reads or writes one.
    """

    pair_dir: Path
    config_hash: str
    every_epochs: int = 1
    every_minutes: float = 10.0
    keep: int = 2
    resume: bool = False
    augment_generator: torch.Generator | None = None
    enabled: bool = True
    last_saved: float = field(default_factory=time.perf_counter)

    @classmethod
    def disabled(cls, pair_dir: Path) -> Checkpointing:
        return cls(pair_dir, "", resume=False, enabled=False)

    def latest(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (the newest readable one of this config, if resuming); the
        time rule's clock starts once it is read."""
        found = None
        if self.enabled and self.resume:
            found = load_latest_checkpoint(self.pair_dir, self.config_hash)
        self.last_saved = time.perf_counter()
        return found

    def time_is_up(self) -> bool:
        """Decided on the main rank and shared, so every rank saves (and synchronises) together."""
        due = self.every_minutes > 0 and time.perf_counter() - self.last_saved >= self.every_minutes * 60
        return self.enabled and any_rank(due)

    def due_after_epoch(self, epoch: int, epochs: int) -> bool:
        """After the last epoch, every ``every_epochs`` epochs, or when the time rule says so."""
        every = self.every_epochs
        epoch_due = epoch == epochs - 1 or (every > 0 and (epoch + 1) % every == 0)
        return self.enabled and (epoch_due or self.time_is_up())

    def after_step(
        self, state: TrainState, method: Method, optimizer: torch.optim.Optimizer, logged: bool, last: bool
    ) -> None:
        """Mid-epoch, a checkpoint when the time rule says so (looked at on logged steps), or when a
        signal asked the run to stop, which it then does. The epoch's ``last`` step leaves both to
        ``after_epoch``, so an epoch's own work (monitor, records) is never skipped."""
        if last:
            return
        signum = agreed_stop()  # every step, reduced on the host: no wait for the device
        if signum or (logged and self.time_is_up()):
            self.save(state, method, optimizer)
        if signum:
            self.stop(state, signum)

    def after_epoch(
        self, state: TrainState, method: Method, optimizer: torch.optim.Optimizer, epoch: int, epochs: int
    ) -> None:
        """After the epoch's own work, a checkpoint when due, or when a signal asked the run to stop."""
        signum = agreed_stop()
        if signum or self.due_after_epoch(epoch, epochs):
            self.save(state, method, optimizer)
        if signum:
            self.stop(state, signum)

    def stop(self, state: TrainState, signum: int) -> None:
        saved = f"checkpoint saved in {self.pair_dir / FOLDER}" if self.enabled else "no checkpoint kept"
        done = f"{state.iteration} completed iteration{'s' if state.iteration != 1 else ''}"
        raise RunInterrupted(f"{self.pair_dir.name} stopped after {done}; {saved}", signum=signum)

    def save(self, state: TrainState, method: Method, optimizer: torch.optim.Optimizer) -> None:
        """Everything the next iteration depends on, written by the main rank; every rank's generators."""
        if not self.enabled:
            return
        with state.timed_aside("checkpoint"):
            payload = state.payload()
            rng = gather_objects(rng_state(self.augment_generator))

            def write() -> None:
                head = {"iteration": payload["iteration"], "config_hash": self.config_hash}
                weights = {"method": method.state_dict(), "optimizer": optimizer.state_dict()}
                save_checkpoint(self.pair_dir, head | weights | payload | {"rng": rng}, self.keep)

            on_main(write)
            self.last_saved = time.perf_counter()
