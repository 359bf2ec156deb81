"""Where a pair's training stands: the position, the records, the loss guard and the clocks.

It is what a checkpoint holds beside the weights, optimizer and random generators, so saving it is
``payload()`` and resuming is one ``TrainState.restore(...)``. The clocks count training time only:
monitoring, logging and checkpoints are timed ``aside``, and the times of sessions before a resume are
carried over, so images/s means the same in a resumed run as in an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sslbench.base.atomic_io import write_text_atomic
from sslbench.base.collectives import is_main, rank
from sslbench.evaluation.diagnostics import embedding_diagnostics
from sslbench.method import Method, Step, StepOutput
from sslbench.training.checkpoint import restore_rng_state
from sslbench.training.step import LossGuard

# What a pair's time aside from training is spent on; eval.json's ``train`` entry has ``<kind>_s``.
ASIDE_KINDS = ("monitor", "checkpoint", "logging")


@dataclass
class TrainState:
    """Position and bookkeeping of one pair's training; everything here survives a resume."""

    iteration: int = 0  # iterations completed
    images_seen: int = 0  # the global batch, summed
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in order
    # called with the records each time metrics.jsonl is written (the run's trackers: --log)
    on_records: Callable[[list[dict[str, Any]]], None] | None = None
    guard: LossGuard = field(default_factory=LossGuard)
    resumed_at: int | None = None
    wall_before: float = 0.0  # training seconds of the sessions before a resume
    # Seconds spent aside from training, by kind (ASIDE_KINDS), this session and the ones before it.
    aside_before: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # this session's clock
    aside: dict[str, float] = field(default_factory=dict)

    @classmethod
    def restore(
        cls,
        checkpoint: dict[str, Any] | None,
        method: Method,
        optimizer: torch.optim.Optimizer,
        augment_generator: torch.Generator | None = None,
    ) -> TrainState:
        """A fresh state, or the one ``checkpoint`` holds with the weights, optimizer and this rank's
        random generators put back, so the next iteration is the one an uninterrupted run would take."""
        if checkpoint is None:
            return cls()
        method.load_state_dict(checkpoint["method"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        states = checkpoint["rng"]  # one per rank, so each rank continues its own draws
        restore_rng_state(states[rank()] if rank() < len(states) else states[0], augment_generator)
        return cls(
            iteration=checkpoint["iteration"],
            images_seen=checkpoint["images_seen"],
            records=list(checkpoint["records"]),
            guard=LossGuard(checkpoint["last_finite_loss"]),
            resumed_at=checkpoint["iteration"] or None,
            wall_before=checkpoint["wall_s"],
            aside_before=dict(checkpoint["aside_s"]),
        )

    def payload(self) -> dict[str, Any]:
        """What a checkpoint stores of this state (the losses are checked first)."""
        wall = self.training_seconds()
        return {
            "iteration": self.iteration,
            "records": self.records,
            "last_finite_loss": self.guard.check(),
            "images_seen": self.images_seen,
            "wall_s": wall,
            "aside_s": self.aside_seconds(),
        }

    def first_batch(self, epoch: int, iterations_per_epoch: int) -> int:
        """Where an epoch starts: past the resume point in the epoch a resume lands in, else at 0."""
        return max((self.resumed_at or 0) - epoch * iterations_per_epoch, 0)

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - sum(self.aside.values()) + self.wall_before

    def aside_seconds(self) -> dict[str, float]:
        """Seconds aside from training by kind, over every session of the pair."""
        kinds = dict.fromkeys(ASIDE_KINDS, 0.0)
        for spent in (self.aside_before, self.aside):
            for kind, seconds in spent.items():
                kinds[kind] = kinds.get(kind, 0.0) + seconds
        return kinds

    @contextlib.contextmanager
    def timed_aside(self, kind: str) -> Iterator[None]:
        """Time spent here (one of ``ASIDE_KINDS``) is not training time: it is counted under ``kind``."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.aside[kind] = self.aside.get(kind, 0.0) + time.perf_counter() - began

    def add_step(self, step: Step, loss: Tensor, images: int) -> None:
        self.guard.add(step, loss)
        self.images_seen += images
        self.iteration = step.iteration + 1

    def log(self, step: Step, output: StepOutput, schedule_values: dict[str, float], bar: tqdm) -> None:
        """A "train" record: the checked loss, the schedules, throughput, the method's logs and the
        collapse diagnostics of the step's embeddings; the loss and images/s also go on the progress bar."""
        loss = self.guard.check()
        with self.timed_aside("logging"):
            elapsed = self.training_seconds()
            record = {"kind": "train", "iteration": step.iteration, "epoch": step.epoch, "loss": loss}
            record |= schedule_values
            record |= {"images_per_s": self.images_seen / elapsed, "elapsed_s": elapsed}
            record |= {key: float(value) for key, value in output.logs.items()}
            if output.embeddings is not None:
                record |= embedding_diagnostics(output.embeddings)
            self.records.append(record)
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{self.images_seen / elapsed:.1f}", refresh=False)

    def write_records(self, pair_dir: Path) -> None:
        """metrics.jsonl, rewritten whole and atomically; in a distributed run by the main rank only."""
        if is_main() and self.records:
            text = "".join(json.dumps(record) + "\n" for record in self.records)
            write_text_atomic(pair_dir / "metrics.jsonl", text)
            if self.on_records is not None:
                self.on_records(self.records)

    def summary(self, epochs: int, total: int) -> dict[str, Any]:
        """The ``train`` entry of eval.json."""
        wall = self.training_seconds()
        return {
            "epochs": epochs,
            "iterations": total,
            "resumed_at": self.resumed_at,
            "wall_s": round(wall, 2),
            **{f"{kind}_s": round(seconds, 2) for kind, seconds in self.aside_seconds().items()},
            "images_per_s": round(self.images_seen / wall, 2) if wall > 0 else None,
            "final_loss": self.guard.last_finite,
            "last_record": next((r for r in reversed(self.records) if r["kind"] == "train"), None),
        }
