"""The one training loop every method goes through, and its one optimization step.

Shared here, so every method gets it identically: per-iteration lr / weight-decay / EMA-momentum
schedules, precision, per-parameter clipping, EMA updates of declared teachers, the non-finite-loss
guard, metrics and collapse diagnostics.

Nothing inside the loop waits for the device: the loss stays a device tensor and is read, with the
guard's check, every ``log_every`` iterations and at each epoch's end (``LossGuard``), so a GPU can run
ahead of the Python loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sslbench.base.atomic_io import write_text_atomic
from sslbench.base.collectives import (
    all_reduce_mean,
    any_rank,
    gather_objects,
    is_main,
    on_main,
    rank,
    world_size,
)
from sslbench.base.errors import SSLBenchError
from sslbench.base.schedules import cosine_schedule
from sslbench.config import TrainConfig
from sslbench.evaluation.diagnostics import embedding_diagnostics
from sslbench.method import Method, Step, StepOutput
from sslbench.models.momentum import ema_update
from sslbench.training.checkpoint import load_latest_checkpoint, restore_rng_state, rng_state, save_checkpoint
from sslbench.training.optim import build_optimizer, parameter_groups


def precision_for(train: TrainConfig, device: torch.device) -> str:
    if train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return train.precision


def memory_format_for(device: torch.device, family: str) -> torch.memory_format:
    """Channels-last convolutions are faster on CUDA tensor cores; the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" and family == "resnet" else torch.contiguous_format


def clip_per_parameter(params: Sequence[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient is clipped to ``max_norm`` on its own.

    One multi-tensor norm and one multi-tensor scale for all parameters, with the factors kept on the
    device (no host synchronisation).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))


def optimization_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: list[Tensor],
    labels: Tensor,
    step: Step,
    clip_grad: float,
    ema_momentum: float,
    autocast: contextlib.AbstractContextManager,
    model: nn.Module | None = None,
) -> tuple[Tensor, StepOutput]:
    """Forward, loss, backward, clipping, the method's hook, optimizer step, EMA: the same for every method.

    ``model`` is what runs the forward: the method itself, or its DistributedDataParallel wrapper.
    Returns the detached loss (a device tensor: reading it is left to the caller) and the output.
    """
    with autocast:
        output = (model or method)(views, labels, step)
    output.loss.backward()
    if clip_grad > 0:
        clip_per_parameter([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    method.after_backward(step)
    optimizer.step()
    # Gradients are freed here, not before the next backward: the next forward's activations then
    # never share memory with a full set of stale gradients (the peak is one or the other).
    optimizer.zero_grad(set_to_none=True)
    ema_update(method.momentum_pairs(), ema_momentum)
    return output.loss.detach(), output


class LossGuard:
    """Holds the losses of the iterations since the last read; reading them is one synchronisation.

    A non-finite loss stops the pair with the iteration where it first appeared, the last finite loss
    and advice. In a distributed run the losses are averaged over ranks first, so every rank stops at
    the same check.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Step, Tensor]] = []
        self.last_finite = math.nan

    def add(self, step: Step, loss: Tensor) -> None:
        self.pending.append((step, loss))

    def check(self) -> float:
        """The latest loss, after checking every pending one."""
        if not self.pending:
            return self.last_finite
        values = all_reduce_mean(torch.stack([loss.float() for _, loss in self.pending])).tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise SSLBenchError(
                    f"loss became {value} at iteration {step.iteration} (epoch {step.epoch}); last finite "
                    f"loss {self.last_finite:.4g}. Try a lower lr (--set train.lr=...), fp32 "
                    "(--set train.precision=fp32), or for DINO a higher teacher temperature."
                )
            self.last_finite = value
        return self.last_finite


def _set_epoch(loader: DataLoader, epoch: int, first_batch: int) -> None:
    """The sampler draws each epoch's order from the epoch, and on a resume starts mid-epoch."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        if first_batch:
            sampler.set_epoch(epoch, skip=first_batch * (loader.batch_size or 1))
        else:
            sampler.set_epoch(epoch)
    elif first_batch:
        raise ValueError("resuming mid-epoch needs a sampler with set_epoch(epoch, skip=...)")


def _to_device(device: torch.device, memory_format: torch.memory_format) -> Callable[[Any], list[Tensor]]:
    def move(views: Any) -> list[Tensor]:
        return [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]

    return move


@dataclass
class Checkpointing:
    """Where and when a pair's checkpoints go, and whether to continue from the newest one."""

    pair_dir: Path
    config_hash: str
    every_epochs: int = 1
    every_minutes: float = 10.0
    keep: int = 2
    resume: bool = False
    augment_generator: torch.Generator | None = None

    def time_is_up(self, since: float) -> bool:
        """Decided on the main rank and shared, so every rank saves (and synchronises) together."""
        due = self.every_minutes > 0 and time.perf_counter() - since >= self.every_minutes * 60
        return any_rank(due)


def train_loop(
    method: Method,
    loader: DataLoader,
    train_cfg: TrainConfig,
    precision: str,
    device: torch.device,
    pair_dir: Path,
    show_progress: bool,
    monitor: Callable[[], dict[str, float]] | None = None,
    monitor_every: int = 0,
    model: nn.Module | None = None,
    make_views: Callable[[Any], list[Tensor]] | None = None,
    checkpointing: Checkpointing | None = None,
) -> dict[str, Any]:
    """Epochs of ``optimization_step`` on per-iteration schedules; metrics.jsonl survives a failure.

    Every ``log_every`` iterations a "train" record holds the schedules, the method's logs and the
    collapse diagnostics of the step's embeddings; every ``monitor_every`` epochs (and before the first)
    a "monitor" record holds ``monitor()``'s k-NN of the student and teacher. ``make_views`` turns a
    loaded batch into device views (default: move them; the GPU augmentation path augments there).
    With ``checkpointing``, checkpoints are saved as it says, and a resume continues from the newest.
    """
    ipe, epochs = len(loader), train_cfg.epochs
    total = ipe * epochs
    scale = train_cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as every reference does
    lr_schedule = cosine_schedule(
        train_cfg.lr * scale, train_cfg.min_lr, epochs, ipe, train_cfg.warmup_epochs
    )
    wd_schedule = cosine_schedule(train_cfg.weight_decay, train_cfg.weight_decay_end, epochs, ipe)
    momentum_schedule = cosine_schedule(train_cfg.ema_momentum, train_cfg.ema_momentum_end, epochs, ipe)
    optimizer = build_optimizer(train_cfg.optimizer, parameter_groups([method]), train_cfg.momentum, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    make_views = make_views or _to_device(device, memory_format_for(device, method.backbone.family))
    guard = LossGuard()
    writes = is_main()  # in a distributed run only the main rank writes and monitors

    records: list[dict[str, Any]] = []
    # Seconds before a resume (wall_before, monitor_before) and in this session (aside: not training).
    start_iteration, images_seen, wall_before, monitor_before, aside = 0, 0, 0.0, 0.0, 0.0
    resumed = None
    if checkpointing is not None and checkpointing.resume:
        resumed = load_latest_checkpoint(checkpointing.pair_dir, checkpointing.config_hash)
    if resumed is not None:
        method.load_state_dict(resumed["method"])
        optimizer.load_state_dict(resumed["optimizer"])
        records = list(resumed["records"])
        guard.last_finite = resumed["last_finite_loss"]
        start_iteration, images_seen = resumed["iteration"], resumed["images_seen"]
        wall_before, monitor_before = resumed["wall_s"], resumed["monitor_s"]
        states = resumed["rng"]  # one per rank, so each rank continues its own draws
        restore_rng_state(
            states[rank()] if rank() < len(states) else states[0], checkpointing.augment_generator
        )

    def save_records() -> None:
        if writes:
            write_text_atomic(pair_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def save_records_together() -> None:
        """Written by the main rank; its error (a full disk) reaches every rank, so none is left waiting."""
        on_main(save_records)

    def watch(epoch: int) -> None:
        nonlocal aside
        due = monitor_every > 0 and (epoch % monitor_every == 0 or epoch == epochs)
        if monitor is not None and due:
            began = time.perf_counter()
            records.append({"kind": "monitor", "epoch": epoch, **on_main(monitor)})  # main computes
            method.train()
            aside += time.perf_counter() - began

    last_checkpoint = time.perf_counter()

    def save(completed: int) -> None:
        """A checkpoint after ``completed`` iterations, with the losses checked first."""
        nonlocal last_checkpoint, aside
        assert checkpointing is not None
        began = time.perf_counter()
        last_finite = guard.check()
        states = gather_objects(rng_state(checkpointing.augment_generator))

        def write() -> None:
            payload = {
                "iteration": completed,
                "config_hash": checkpointing.config_hash,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "records": records,
                "last_finite_loss": last_finite,
                "images_seen": images_seen,
                "wall_s": began - start - aside + wall_before,
                "monitor_s": aside + monitor_before,
                "rng": states,
            }
            save_checkpoint(checkpointing.pair_dir, payload, checkpointing.keep)

        on_main(write)
        last_checkpoint = time.perf_counter()
        aside += last_checkpoint - began

    loss = guard.last_finite
    method.train()
    start = time.perf_counter()
    if start_iteration == 0:
        watch(0)
    bar = tqdm(
        total=total,
        initial=start_iteration,
        desc=f"{method.name}-{method.backbone.arch}",
        disable=not (show_progress and writes),
        dynamic_ncols=True,
    )
    try:
        for epoch in range(start_iteration // ipe, epochs):
            first_batch = start_iteration - epoch * ipe if epoch == start_iteration // ipe else 0
            _set_epoch(loader, epoch, first_batch)
            for batch_index, (batch, labels) in enumerate(loader, start=first_batch):
                it = epoch * ipe + batch_index
                logged = it % train_cfg.log_every == 0 or it == total - 1
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[it])
                    if group["regularized"]:
                        group["weight_decay"] = float(wd_schedule[it])
                views = make_views(batch)
                labels = labels.to(device, non_blocking=True)
                step = Step(it, epoch, ipe, total, diagnose=logged)
                momentum = float(momentum_schedule[it])
                step_loss, output = optimization_step(
                    method, optimizer, views, labels, step, train_cfg.clip_grad, momentum, autocast, model
                )
                guard.add(step, step_loss)
                images_seen += labels.shape[0] * world_size()  # the global batch
                if logged:
                    loss = guard.check()
                    began = time.perf_counter()
                    elapsed = began - start - aside + wall_before
                    record = {"kind": "train", "iteration": it, "epoch": epoch, "loss": loss}
                    record |= {"lr": float(lr_schedule[it]), "weight_decay": float(wd_schedule[it])}
                    record |= {
                        "ema_momentum": momentum,
                        "images_per_s": images_seen / elapsed,
                        "elapsed_s": elapsed,
                    }
                    record |= {key: float(value) for key, value in output.logs.items()}
                    if output.embeddings is not None:
                        record |= embedding_diagnostics(output.embeddings)
                    records.append(record)
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_seen / elapsed:.1f}", refresh=False)
                    aside += time.perf_counter() - began
                    mid_epoch = batch_index < ipe - 1
                    if checkpointing is not None and mid_epoch and checkpointing.time_is_up(last_checkpoint):
                        save(it + 1)
                bar.update(1)
            loss = guard.check()
            watch(epoch + 1)
            save_records_together()
            if checkpointing is not None:
                every = checkpointing.every_epochs
                epoch_due = epoch == epochs - 1 or (every > 0 and (epoch + 1) % every == 0)
                if epoch_due or checkpointing.time_is_up(last_checkpoint):
                    save((epoch + 1) * ipe)
    finally:
        bar.close()
        if records:  # what led up to a failure is worth keeping
            save_records()
    wall = time.perf_counter() - start - aside + wall_before
    return {
        "epochs": epochs,
        "iterations": total,
        "resumed_at": start_iteration or None,
        "wall_s": round(wall, 2),
        "monitor_s": round(aside + monitor_before, 2),
        "images_per_s": round(images_seen / wall, 2) if wall > 0 else None,
        "final_loss": loss,
        "last_record": next((r for r in reversed(records) if r["kind"] == "train"), None),
    }
