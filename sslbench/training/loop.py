"""The one training loop every method goes through, reading top to bottom like the DINO reference's
``train_one_epoch``: for each epoch, for each batch, the schedules, the views, one optimization step,
logging, and a checkpoint when one is due or when a signal asks the run to stop.

What the loop does not spell out lives in named pieces: the step and the schedules in
``sslbench.training.step``, the position, records and clocks in ``sslbench.training.state``, and when
and how checkpoints are written in ``sslbench.training.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sslbench.base.collectives import is_main, on_main, world_size
from sslbench.base.precision import autocast_for
from sslbench.config import TrainConfig
from sslbench.method import Method, Step
from sslbench.training.checkpoint import Checkpointing
from sslbench.training.interrupt import stop_signals_deferred
from sslbench.training.optim import build_optimizer, method_parameter_groups
from sslbench.training.state import TrainState
from sslbench.training.step import Schedules, device_views, memory_format_for, optimization_step


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
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Epochs of ``optimization_step`` on per-iteration schedules; returns eval.json's ``train`` entry.

    ``model`` runs the forward (the method or its DDP wrapper); ``make_views`` turns a loaded batch into
    device views (default: move them); ``monitor`` is the k-NN watch run every ``monitor_every`` epochs;
    ``on_records`` sees the records whenever metrics.jsonl is written.
    """
    ipe, epochs = len(loader), train_cfg.epochs
    schedules = Schedules.for_run(train_cfg, ipe)
    optimizer = build_optimizer(
        train_cfg.optimizer, method_parameter_groups(method), train_cfg.momentum, device
    )
    autocast = autocast_for(precision, device)
    make_views = make_views or device_views(device, memory_format_for(device, method.backbone.family))
    checkpoints = checkpointing or Checkpointing.disabled(pair_dir)
    state = TrainState.restore(checkpoints.latest(), method, optimizer, checkpoints.augment_generator)
    state.on_records = on_records  # trackers see what metrics.jsonl holds, each time it is written
    method.train()
    if state.iteration == 0:
        watch(state, method, monitor, monitor_every, 0, epochs)
    bar = progress_bar(method, state.iteration, schedules.total, show_progress)
    try:
        for epoch in range(state.iteration // ipe, epochs):
            for batch_index, (batch, labels) in epoch_batches(loader, epoch, state.first_batch(epoch, ipe)):
                it = epoch * ipe + batch_index
                schedules.apply(optimizer, it)
                views, labels = make_views(batch), labels.to(device, non_blocking=True)
                step = Step(it, epoch, ipe, schedules.total, diagnose=logging_due(it, train_cfg, schedules))
                momentum = float(schedules.ema_momentum[it])
                loss, output = optimization_step(
                    method, optimizer, views, labels, step, train_cfg.clip_grad, momentum, autocast, model
                )
                state.add_step(step, loss, labels.shape[0] * world_size())  # the global batch
                if step.diagnose:
                    state.log(step, output, schedules.at(it), bar)
                bar.update(1)
                checkpoints.after_step(state, method, optimizer, step.diagnose, batch_index == ipe - 1)
            state.guard.check()
            watch(state, method, monitor, monitor_every, epoch + 1, epochs)
            on_main(lambda: state.write_records(pair_dir))  # a full disk's error reaches every rank
            checkpoints.after_epoch(state, method, optimizer, epoch, epochs)
    finally:
        bar.close()
        state.write_records(pair_dir)  # what led up to a failure is worth keeping
    return state.summary(epochs, schedules.total)


def epoch_batches(loader: DataLoader, epoch: int, first_batch: int) -> Iterator[tuple[int, Any]]:
    """The epoch's batches with their index; the sampler draws the order from the epoch, and on a
    resume starts at ``first_batch``."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        if first_batch:
            sampler.set_epoch(epoch, skip=first_batch * (loader.batch_size or 1))
        else:
            sampler.set_epoch(epoch)
    elif first_batch:
        raise ValueError("resuming mid-epoch needs a sampler with set_epoch(epoch, skip=...)")
    with stop_signals_deferred():  # workers start here: a Ctrl-C must reach the training process alone
        batches = iter(loader)
    return enumerate(batches, start=first_batch)


def logging_due(iteration: int, train_cfg: TrainConfig, schedules: Schedules) -> bool:
    """Every ``log_every`` iterations and the last: only then are losses read and diagnostics computed."""
    return iteration % train_cfg.log_every == 0 or iteration == schedules.total - 1


def progress_bar(method: Method, done: int, total: int, show: bool) -> tqdm:
    """One bar per pair, shown by the main rank only."""
    name = f"{method.name}-{method.backbone.arch}"
    return tqdm(total=total, initial=done, desc=name, disable=not (show and is_main()), dynamic_ncols=True)


def watch(
    state: TrainState, method: Method, monitor: Callable[[], dict] | None, every: int, epoch: int, epochs: int
) -> None:
    """Before training and every ``every`` epochs (and after the last), a "monitor" record of the k-NN of
    student and teacher: computed by the main rank, timed aside."""
    if monitor is None or every <= 0 or not (epoch % every == 0 or epoch == epochs):
        return
    with state.timed_aside("monitor"):
        state.records.append({"kind": "monitor", "epoch": epoch, **on_main(monitor)})
        method.train()
