"""One (method, arch) pair: its plan, its data, the shared training loop, and the evaluation of what it
trained.

The loop lives in ``sslbench.training.loop`` and its step (schedules, precision, clipping, EMA updates,
the loss guard) in ``sslbench.training.step``; this module builds what the loop needs for one pair and
records the protocol beside the numbers.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sslbench.base.atomic_io import atomic_path
from sslbench.base.collectives import is_main, rank, world_size
from sslbench.base.precision import precision_choice
from sslbench.config import RunConfig, TrainConfig, build_dataclass, config_hash
from sslbench.data.augment import blur_description, build_view_transform
from sslbench.data.datasets import DatasetSplits, ImageSource, SubsetSource, subset_indices
from sslbench.data.sampling import EpochSampler, SeededViews
from sslbench.evaluation.diagnostics import collapse_verdict
from sslbench.evaluation.evaluate import evaluate_method
from sslbench.evaluation.features import feature_precision
from sslbench.evaluation.monitor import KnnMonitor
from sslbench.method import Method, TrainContext
from sslbench.models.backbones import (
    Backbone,
    arch_spec,
    create_backbone,
    effective_patch_size,
    set_fused_attention,
)
from sslbench.training.checkpoint import Checkpointing
from sslbench.training.distributed import data_parallel, sync_batch_norm
from sslbench.training.interrupt import training_section, worker_signal_setup
from sslbench.training.loop import train_loop
from sslbench.training.step import fused_attention_for, memory_format_for, precision_for


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
    seed: int | None = None  # one of several seeds (--seeds): the folder is <method>-<arch>-seed<N>

    @property
    def folder_name(self) -> str:
        variant = f"@{self.variant}" if self.variant else ""
        seed = f"-seed{self.seed}" if self.seed is not None else ""
        return f"{self.method_cls.name}{variant}-{self.arch}{seed}"


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

    A paper recipe depends on the backbone family, the image size (SimCLR's CIFAR recipe) and the
    epochs (BYOL's); it replaces its keys of the schedule and of the method's options, whatever set them.
    ``image_size`` None: a large-image run.
    """
    family = arch_spec(arch).family
    train = config.train
    recipe = "shared"
    options = dict(config.method_options.get(method_cls.name, {}))
    if config.recipe == "paper":
        size = image_size if image_size is not None else 224
        published = method_cls.paper_recipe(family, size, train.epochs)
        if published is not None:
            train = dataclasses.replace(train, **published.train)
            options |= published.options
            recipe = f"paper ({method_cls.name}, {published.label}): {published.source}"
    options = build_dataclass(method_cls.Config, options, method_cls.name)
    return PairPlan(method_cls, arch, train, recipe, options, device)


def compile_backbones(method: Method) -> None:
    """``torch.compile`` the backbones in place (student and EMA copy): their state_dict keys stay as
    they are, and the heads and losses, small and cheap, stay eager.

    Static shapes, one graph per crop resolution: multi-crop has two or three, and a ViT's position
    embedding resized for local crops fails to compile with symbolic sizes (PyTorch 2.14).
    """
    backbones = [method.backbone, method.momentum_backbone()]
    for backbone in {id(b): b for b in backbones if b is not None}.values():
        backbone.compile(dynamic=False)


def training_data(
    method: Method,
    source: ImageSource,
    data: DatasetSplits,
    train_cfg: TrainConfig,
    seed: int,
    device: torch.device,
) -> tuple[DataLoader, Callable[[Any], list[Tensor]] | None, torch.Generator | None]:
    """The loader of this rank's share of each global batch, how a batch becomes device views, and the
    generator the GPU augmentation draws from (None on the CPU path; checkpoints save its state).

    ``augment_on="cpu"``: the recipe's PIL transforms in the loader (workers), views moved to the
    device. ``"gpu"``: the loader only decodes images onto a fixed canvas and the same recipe runs on
    the whole batch on the device (``sslbench.data.gpu_augment``).
    """
    per_rank = train_cfg.batch_size // world_size()
    recipe = method.view_recipe()
    make_views, generator = None, None
    if train_cfg.augment_on == "gpu":
        from sslbench.data.gpu_augment import BatchViewAugmenter
        from sslbench.data.image_canvas import ImageCanvas, canvas_size_for

        augmenter = BatchViewAugmenter.from_recipe(recipe, data.image_size, data.mean, data.std).to(device)
        transform: Callable[[Any], Any] = ImageCanvas(canvas_size_for(data.image_size))
        generator = torch.Generator(device).manual_seed(seed * 1009 + rank())
        memory_format = memory_format_for(device, method.backbone.family)

        def make_views(batch: Any) -> list[Tensor]:
            canvas, sizes = (t.to(device, non_blocking=True) for t in batch)
            return [v.contiguous(memory_format=memory_format) for v in augmenter(canvas, sizes, generator)]
    else:
        transform = build_view_transform(recipe, data.image_size, data.mean, data.std)
    loader = DataLoader(
        SeededViews(source, transform, seed),
        batch_size=per_rank,
        sampler=EpochSampler(len(source), seed, per_rank, rank(), world_size()),
        drop_last=True,
        num_workers=train_cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=train_cfg.num_workers > 0,
        # Its own generator for the workers' base seed, so starting an epoch's iterator never draws
        # from the global generator (a resumed run then draws exactly what an uninterrupted one does).
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=worker_signal_setup(),  # the main process stops the run; workers wait for it
    )
    return loader, make_views, generator


def train_and_evaluate(
    plan: PairPlan,
    config: RunConfig,
    data: DatasetSplits,
    pair_dir: Path,
    show_progress: bool = True,
    resume: bool = False,
    eval_data: DatasetSplits | None = None,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any] | None:
    """Train one pair, evaluate it on frozen features, and return the eval.json record.

    ``eval_data`` (``--eval-dataset``): evaluate on another dataset than the one trained on. With
    ``resume``, training continues from the pair's newest checkpoint (if any). In a distributed run every
    rank trains; only the main rank evaluates and returns the record.
    """
    seed_everything(config.seed)
    backbone = create_backbone(plan.arch, data.image_size, plan.train.drop_path_rate)
    train_source = training_source(data, plan.train, config.seed, plan.method_cls.needs_labels)
    method = build_method(plan, backbone, data, len(train_source) // plan.train.batch_size)
    pair_hash = pair_config_hash(plan, config, data, method)
    train_summary: dict[str, Any] = {"epochs": 0, "wall_s": 0.0, "images_per_s": None, "final_loss": None}
    if plan.method_cls.trainable:
        train_summary = train_pair(
            method, plan, config, data, train_source, pair_dir, pair_hash, show_progress, resume, on_records
        )
    if not is_main():
        return None
    eval_started = time.perf_counter()
    if plan.train.save_weights:  # the evaluated network, for attention maps and later evaluation
        with atomic_path(pair_dir / "backbone.pt") as tmp:
            torch.save(method.eval_backbone().state_dict(), tmp)
    cache_dir = pair_dir if config.eval.cache_features else None
    evaluated_on = eval_data or data
    metrics = evaluate_method(method, config, evaluated_on, plan.device, cache_dir)
    protocol = protocol_record(plan, config, data, method, len(train_source))
    return {
        "eval_s": round(time.perf_counter() - eval_started, 2),
        "status": "ok",
        "error": None,
        "variant": plan.variant,
        "seed": config.seed,
        **evaluation_fields(metrics),
        "train": train_summary,
        "collapse": collapse_check(method, train_summary.pop("last_record", None), pair_dir.name),
        "protocol": protocol
        | evaluation_protocol(config, evaluated_on, metrics)
        | {"config_hash": pair_hash},
        "method_options": method.resolved_options(),
    }


def evaluation_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation as eval.json holds them (intervals and low-shot only when made)."""
    fields = {"knn": metrics["knn"], "linear": metrics["linear"]}
    if metrics.get("knn_ci95"):
        fields["knn_ci95"] = metrics["knn_ci95"]
    if metrics.get("low_shot"):
        fields["low_shot"] = metrics["low_shot"]
    return fields


def evaluation_protocol(config: RunConfig, data: DatasetSplits, metrics: dict[str, Any]) -> dict[str, Any]:
    """How the numbers were made, whoever trained the network: the data it was evaluated on, the k-NN,
    the linear protocol, the low-shot settings and the intervals."""
    return {
        "eval_dataset": data.name,
        "eval_dataset_description": data.description,
        "eval_image_size": data.image_size,
        "test_images": metrics["test_images"],
        "knn_bank_images": metrics["bank_images"],
        "knn_k": config.eval.knn_headline_k,
        "knn_temperature": config.eval.knn_temperature,
        "linear_kind": metrics["linear_kind"],
        "linear_protocol": metrics["linear_protocol"],
        "low_shot": ", ".join(config.eval.low_shot) or None,
        "intervals": (
            f"95% percentile bootstrap over the test images, {config.eval.bootstrap_resamples} resamples"
            if config.eval.bootstrap_resamples > 0
            else None
        ),
    }


def training_source(
    data: DatasetSplits, train_cfg: TrainConfig, seed: int, needs_labels: bool = False
) -> ImageSource:
    """The images a method pretrains on: the dataset's pretraining split where it has one (STL-10's
    unlabelled images) unless the method needs labels, else the training split; with
    ``train.train_per_class`` a seeded subset of it (balanced by class where there are labels)."""
    source = data.train if needs_labels or data.pretrain is None else data.pretrain
    if train_cfg.train_per_class is None:
        return source
    if (source.labels < 0).all():  # unlabelled: as many images as a balanced subset would hold
        count = min(len(source), train_cfg.train_per_class * data.num_classes)
        indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:count])
        return SubsetSource(source, indices)
    return SubsetSource(source, subset_indices(source.labels, train_cfg.train_per_class, seed))


def build_method(
    plan: PairPlan, backbone: Backbone, data: DatasetSplits, iterations_per_epoch: int
) -> Method:
    """The pair's method on its device: global BatchNorm across ranks, the layout the device likes, and
    compiled backbones if asked. ``iterations_per_epoch`` >= 1: run_benchmark checked the batch fits."""
    train_cfg, device = plan.train, plan.device
    context = TrainContext(train_cfg.epochs, iterations_per_epoch, data.num_classes, data.image_size)
    method = plan.method_cls(backbone, plan.method_options, context)
    method = sync_batch_norm(method, device)  # global BatchNorm statistics across ranks, as the papers
    method = method.to(device, memory_format=memory_format_for(device, backbone.family))
    if not fused_attention_for(device, precision_for(train_cfg, device)):
        set_fused_attention(method, False)  # elsewhere timm's own choice stands
    if train_cfg.compile:
        compile_backbones(method)
    return method


def pair_config_hash(plan: PairPlan, config: RunConfig, data: DatasetSplits, method: Method) -> str:
    """What determines this pair's numbers; checkpoints carry it, and only a match is resumed."""
    return config_hash(
        {
            "train": dataclasses.asdict(plan.train),
            "eval": dataclasses.asdict(config.eval),
            "options": method.resolved_options(),
            "method": plan.method_cls.name,
            "arch": plan.arch,
            "dataset": data.name,
            "image_size": data.image_size,
            "seed": config.seed,
            # auto resolves per machine: a bf16 checkpoint is not resumed in fp32, nor the reverse
            "precision": precision_for(plan.train, plan.device),
        }
    )


def train_pair(
    method: Method,
    plan: PairPlan,
    config: RunConfig,
    data: DatasetSplits,
    train_source: ImageSource,
    pair_dir: Path,
    pair_hash: str,
    show_progress: bool,
    resume: bool,
    on_records: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """The pair's loader, checkpoints and k-NN monitor, then the one training loop."""
    train_cfg, device = plan.train, plan.device
    loader, make_views, generator = training_data(method, train_source, data, train_cfg, config.seed, device)
    checkpointing = Checkpointing(
        pair_dir,
        pair_hash,
        train_cfg.checkpoint_every_epochs,
        train_cfg.checkpoint_every_minutes,
        train_cfg.keep_checkpoints,
        resume,
        generator,
    )
    if world_size() > 1:  # identical initial weights; each rank its own drop-path draws
        torch.manual_seed(config.seed + rank())
    watched = {"student": method.backbone, "teacher": method.momentum_backbone()}
    monitor = KnnMonitor(data, config, device, {k: v for k, v in watched.items() if v is not None})
    with training_section(pair_dir.name):  # a first Ctrl-C or SIGTERM: the step finishes, a checkpoint
        return train_loop(
            method,
            loader,
            train_cfg,
            precision_for(train_cfg, device),
            device,
            pair_dir,
            show_progress,
            monitor,
            config.eval.monitor_every,
            model=data_parallel(method, device),
            make_views=make_views,
            checkpointing=checkpointing,
            on_records=on_records,
        )


def protocol_record(
    plan: PairPlan,
    config: RunConfig,
    data: DatasetSplits,
    method: Method,
    train_images: int,
) -> dict[str, Any]:
    """Every protocol detail of the training beside the numbers it produced (``evaluation_protocol``:
    the evaluation's)."""
    train_cfg, trainable = plan.train, plan.method_cls.trainable
    precision, precision_reason = precision_choice(train_cfg.precision, plan.device)
    features_in, features_reason = feature_precision(config, plan.device)
    return {
        "dataset": data.name,
        "dataset_description": data.description,
        "skipped_images": data.skipped_images,
        "train_images": train_images if trainable else 0,
        "image_size": data.image_size,
        "normalize_mean": list(data.mean),  # the network's input normalisation (sslbench export)
        "normalize_std": list(data.std),
        "patch_size": effective_patch_size(plan.arch, data.image_size),
        "crops": method.view_recipe().describe(data.image_size) if trainable else "none (untrained)",
        "epochs": train_cfg.epochs if trainable else 0,
        "batch_size": train_cfg.batch_size,
        "processes": world_size(),
        "augment_on": train_cfg.augment_on if trainable else None,
        "compile": train_cfg.compile,
        "optimizer": train_cfg.optimizer,
        "base_lr": train_cfg.lr,
        "recipe": plan.recipe,
        "precision": precision,
        "precision_reason": precision_reason,
        "feature_precision": features_in,
        "feature_precision_reason": features_reason,
        "blur": blur_description(method.view_recipe(), data.image_size) if trainable else "none (untrained)",
        "seed": config.seed,
        "device": str(plan.device),
        "feature_source": method.feature_source if trainable else "untrained backbone",
        "linear_features": method.eval_backbone().linear_features_description,
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
