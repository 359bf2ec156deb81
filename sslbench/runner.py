"""The one training loop, and evaluation of what it trained, for one (method, arch) pair.

Everything shared lives here, so every method gets it identically: optimizer and parameter groups,
per-iteration lr / weight-decay / EMA-momentum schedules, precision, gradient clipping, EMA updates of
declared teachers, metrics, and the frozen-feature evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sslbench.atomic_io import atomic_path, write_text_atomic
from sslbench.augment import SMALL_IMAGE_MAX, build_view_transform
from sslbench.backbones import arch_spec, create_backbone, effective_patch_size
from sslbench.config import RunConfig, TrainConfig, build_dataclass, config_hash
from sslbench.datasets import DatasetSplits, SubsetSource, TransformDataset, make_loader, subset_indices
from sslbench.diagnostics import collapse_verdict, embedding_diagnostics
from sslbench.errors import SSLBenchError
from sslbench.evaluate import KnnMonitor, evaluate_method
from sslbench.method import Method, Step, StepOutput, TrainContext
from sslbench.momentum import ema_update
from sslbench.optim import build_optimizer, parameter_groups
from sslbench.schedules import cosine_schedule


@dataclass(frozen=True)
class PairPlan:
    """Everything resolved for one (method, arch) pair before training starts."""

    method_cls: type[Method]
    arch: str
    train: TrainConfig  # after the paper recipe, if any, was applied
    recipe: str
    method_options: Any
    device: torch.device
    variant: str | None = None  # an ablation's name; the pair's folder is <method>@<variant>-<arch>

    @property
    def folder_name(self) -> str:
        variant = f"@{self.variant}" if self.variant else ""
        return f"{self.method_cls.name}{variant}-{self.arch}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_pair(
    method_cls: type[Method],
    arch: str,
    config: RunConfig,
    device: torch.device,
    image_size: int | None = None,
) -> PairPlan:
    """Resolve the pair's schedule (the shared one, or the method's paper recipe) and its options.

    A paper recipe may differ for small images (key ``"<family>_small"``, e.g. SimCLR's CIFAR recipe).
    """
    family = arch_spec(arch).family
    train = config.train
    recipe = "shared"
    if config.recipe == "paper":
        small = image_size is not None and image_size <= SMALL_IMAGE_MAX
        key = f"{family}_small" if small and f"{family}_small" in method_cls.paper_recipe else family
        overrides = method_cls.paper_recipe.get(key)
        if overrides:
            train = dataclasses.replace(train, **overrides)
            recipe = f"paper ({method_cls.name}, {key})"
    options = build_dataclass(
        method_cls.Config, config.method_options.get(method_cls.name, {}), method_cls.name
    )
    return PairPlan(method_cls, arch, train, recipe, options, device)


def precision_for(train: TrainConfig, device: torch.device) -> str:
    if train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return train.precision


def memory_format_for(device: torch.device, family: str) -> torch.memory_format:
    """Channels-last convolutions are faster on CUDA tensor cores; the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" and family == "resnet" else torch.contiguous_format


def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient is clipped to ``max_norm`` on its own."""
    for param in params:
        if param.grad is not None:
            norm = param.grad.detach().norm(2)
            param.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def train_and_evaluate(
    plan: PairPlan, config: RunConfig, data: DatasetSplits, pair_dir: Path, show_progress: bool = True
) -> dict[str, Any]:
    """Train one pair, evaluate it on frozen features, and return the eval.json record."""
    train_cfg, device = plan.train, plan.device
    image_size = data.image_size
    seed_everything(config.seed)
    backbone = create_backbone(plan.arch, image_size, train_cfg.drop_path_rate)

    train_source = data.train
    if train_cfg.train_per_class is not None:
        train_source = SubsetSource(
            train_source, subset_indices(train_source.labels, train_cfg.train_per_class, config.seed)
        )
    iterations_per_epoch = len(train_source) // train_cfg.batch_size
    if plan.method_cls.trainable and iterations_per_epoch == 0:
        raise SSLBenchError(
            f"batch size {train_cfg.batch_size} is larger than the training set "
            f"({len(train_source)} images): lower --batch-size"
        )
    context = TrainContext(train_cfg.epochs, iterations_per_epoch, data.num_classes, image_size)
    method = plan.method_cls(backbone, plan.method_options, context)
    method = method.to(device, memory_format=memory_format_for(device, backbone.family))
    precision = precision_for(train_cfg, device)
    crops = "none (untrained)"

    train_summary: dict[str, Any] = {"epochs": 0, "wall_s": 0.0, "images_per_s": None, "final_loss": None}
    if plan.method_cls.trainable:
        recipe_views = method.view_recipe()
        crops = recipe_views.describe(image_size)
        dataset = TransformDataset(
            train_source, build_view_transform(recipe_views, image_size, data.mean, data.std)
        )
        loader = make_loader(
            dataset, train_cfg.batch_size, True, config.seed, train_cfg.num_workers, device, drop_last=True
        )
        watched = {"student": method.backbone, "teacher": method.momentum_backbone()}
        monitor = KnnMonitor(data, config, device, {k: v for k, v in watched.items() if v is not None})
        train_summary = train_loop(
            method,
            loader,
            train_cfg,
            precision,
            device,
            pair_dir,
            show_progress,
            monitor,
            config.eval.monitor_every,
        )
    if train_cfg.save_weights:  # the evaluated network, for attention maps and later evaluation
        with atomic_path(pair_dir / "backbone.pt") as tmp:
            torch.save(method.eval_backbone().state_dict(), tmp)

    metrics = evaluate_method(method, config, data, device)
    patch = effective_patch_size(plan.arch, image_size)
    protocol = {
        "dataset": data.name,
        "dataset_description": data.description,
        "train_images": len(train_source) if plan.method_cls.trainable else 0,
        "test_images": metrics.pop("test_images"),
        "knn_bank_images": metrics.pop("bank_images"),
        "image_size": image_size,
        "patch_size": patch,
        "crops": crops,
        "epochs": train_cfg.epochs if plan.method_cls.trainable else 0,
        "batch_size": train_cfg.batch_size,
        "optimizer": train_cfg.optimizer,
        "base_lr": train_cfg.lr,
        "recipe": plan.recipe,
        "precision": precision,
        "seed": config.seed,
        "device": str(device),
        "feature_source": method.feature_source if plan.method_cls.trainable else "untrained backbone",
        "knn_k": config.eval.knn_headline_k,
        "knn_temperature": config.eval.knn_temperature,
        "linear_features": method.eval_backbone().linear_features_description,
        "linear_protocol": (
            f"SGD on standardised frozen features, {config.eval.linear_epochs} epochs, lr sweep "
            f"{config.eval.linear_lrs} chosen on {config.eval.linear_val_fraction:.0%} held out"
        ),
    }
    protocol["config_hash"] = config_hash(
        {
            "train": dataclasses.asdict(train_cfg),
            "eval": dataclasses.asdict(config.eval),
            "options": method.resolved_options(),
            "method": plan.method_cls.name,
            "arch": plan.arch,
            "dataset": data.name,
            "image_size": image_size,
            "seed": config.seed,
        }
    )
    return {
        "status": "ok",
        "error": None,
        "variant": plan.variant,
        "knn": metrics["knn"],
        "linear": metrics["linear"],
        "train": train_summary,
        "collapse": collapse_check(method, train_summary.pop("last_record", None), pair_dir.name),
        "protocol": protocol,
        "method_options": method.resolved_options(),
    }


def collapse_check(
    method: Method, last_record: dict[str, Any] | None, pair_name: str
) -> dict[str, Any] | None:
    """The verdict on the last logged diagnostics; a collapse is also said in plain words on stderr."""
    if last_record is None:
        return None
    verdict = collapse_verdict(last_record, method.resolved_options().get("out_dim"))
    if verdict["collapsed"]:
        warnings.warn(
            f"{pair_name} collapsed: {'; '.join(verdict['reasons'])}. {verdict['advice']}", stacklevel=2
        )
    return verdict


def optimization_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    labels: torch.Tensor,
    step: Step,
    clip_grad: float,
    ema_momentum: float,
    autocast: contextlib.AbstractContextManager,
    last_finite_loss: float = math.nan,
) -> tuple[float, StepOutput]:
    """Forward, loss, backward, clipping, the method's hook, optimizer step, EMA: the same for every method.

    Returns the loss and the method's output. Reading the loss is the one host synchronisation per step;
    a non-finite loss stops the pair with advice before it corrupts the weights.
    """
    with autocast:
        output = method.training_step(views, labels, step)
    loss = output.loss.item()
    if not math.isfinite(loss):
        raise SSLBenchError(
            f"loss became {loss} at iteration {step.iteration} (epoch {step.epoch}); last finite loss "
            f"{last_finite_loss:.4g}. Try a lower lr (--set train.lr=...), fp32 "
            "(--set train.precision=fp32), or for DINO a higher teacher temperature."
        )
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    if clip_grad > 0:
        clip_per_parameter([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    method.after_backward(step)
    optimizer.step()
    ema_update(method.momentum_pairs(), ema_momentum)
    return loss, output


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
) -> dict[str, Any]:
    """Epochs of ``optimization_step`` on per-iteration schedules; metrics.jsonl survives a failure.

    Every ``log_every`` iterations a "train" record holds the schedules, the method's logs and the
    collapse diagnostics of the step's embeddings; every ``monitor_every`` epochs (and before the first)
    a "monitor" record holds ``monitor()``'s k-NN of the student and teacher.
    """
    ipe, epochs = len(loader), train_cfg.epochs
    total = ipe * epochs
    scale = train_cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as every reference does
    lr_schedule = cosine_schedule(
        train_cfg.lr * scale, train_cfg.min_lr, epochs, ipe, train_cfg.warmup_epochs
    )
    wd_schedule = cosine_schedule(train_cfg.weight_decay, train_cfg.weight_decay_end, epochs, ipe)
    momentum_schedule = cosine_schedule(train_cfg.ema_momentum, train_cfg.ema_momentum_end, epochs, ipe)
    optimizer = build_optimizer(train_cfg.optimizer, parameter_groups([method]), train_cfg.momentum)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    memory_format = memory_format_for(device, method.backbone.family)

    records: list[dict[str, Any]] = []

    def save_records() -> None:
        write_text_atomic(pair_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    aside = 0.0  # seconds spent monitoring and diagnosing: not training, so not in the throughput

    def watch(epoch: int) -> None:
        nonlocal aside
        if monitor is not None and monitor_every > 0 and (epoch % monitor_every == 0 or epoch == epochs):
            began = time.perf_counter()
            records.append({"kind": "monitor", "epoch": epoch, **monitor()})
            method.train()
            aside += time.perf_counter() - began

    loss = math.nan
    images_seen = 0
    method.train()
    watch(0)
    start = time.perf_counter()
    bar = tqdm(
        total=total,
        desc=f"{method.name}-{method.backbone.arch}",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(epochs):
            for batch_index, (views, labels) in enumerate(loader):
                it = epoch * ipe + batch_index
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[it])
                    if group["regularized"]:
                        group["weight_decay"] = float(wd_schedule[it])
                views = [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
                labels = labels.to(device, non_blocking=True)
                step = Step(it, epoch, ipe, total)
                momentum = float(momentum_schedule[it])
                loss, output = optimization_step(
                    method, optimizer, views, labels, step, train_cfg.clip_grad, momentum, autocast, loss
                )
                images_seen += labels.shape[0]
                elapsed = time.perf_counter() - start - aside
                if it % train_cfg.log_every == 0 or it == total - 1:
                    began = time.perf_counter()
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
                    aside += time.perf_counter() - began
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    lr=f"{lr_schedule[it]:.2e}",
                    img_s=f"{images_seen / elapsed:.1f}",
                    refresh=False,
                )
                bar.update(1)
            watch(epoch + 1)
            save_records()
    finally:
        bar.close()
        if records:  # what led up to a failure is worth keeping
            save_records()
    wall = time.perf_counter() - start - aside
    return {
        "epochs": epochs,
        "iterations": total,
        "wall_s": round(wall, 2),
        "monitor_s": round(aside, 2),
        "images_per_s": round(images_seen / wall, 2),
        "final_loss": loss,
        "last_record": next((r for r in reversed(records) if r["kind"] == "train"), None),
    }
