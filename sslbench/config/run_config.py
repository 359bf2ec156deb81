"""The run's settings as typed dataclasses, and the checks every layer of them passes.

An unknown key is an error that suggests the closest valid one, and a value of the wrong type is an
error naming the key and the expected type; values a type cannot rule out are checked before anything
trains. Defaults are the DINO reference recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from sslbench.base.errors import SSLBenchError
from sslbench.base.precision import PRECISIONS

# The optimizers sslbench.training.optim builds, by the name train.optimizer takes.
OPTIMIZERS = ("adamw", "sgd", "lars")


@dataclass
class TrainConfig:
    """The schedule every method in a run shares. Defaults: the DINO reference recipe."""

    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 5e-4  # per 256 images: the used lr is lr * batch_size / 256 (linear scaling rule)
    min_lr: float = 1e-6  # the cosine ends here
    warmup_epochs: float = 10  # linear warm-up of the lr from 0
    weight_decay: float = 0.04  # cosine from weight_decay to weight_decay_end; none on biases and norms
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # SGD / LARS momentum
    ema_momentum: float = 0.996  # teacher/target EMA, cosine to ema_momentum_end per iteration
    ema_momentum_end: float = 1.0
    clip_grad: float = 3.0  # per-parameter gradient norm clip as in DINO; 0 disables
    drop_path_rate: float = 0.1  # stochastic depth in ViTs (DINO's ViT-S value)
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX / AVX512-BF16, else fp32) | fp32 | bf16
    num_workers: int = 0  # data-loading processes; 0 loads in the training process
    train_per_class: int | None = None  # train on a balanced subset of this many images per class
    log_every: int = 10  # iterations between metrics.jsonl lines (with collapse diagnostics)
    save_weights: bool = True  # backbone.pt of the evaluated network, for attention maps
    augment_on: str = "cpu"  # cpu: the PIL recipes in loader workers | gpu: the same recipes, batched
    compile: bool = False  # torch.compile the backbones (worth it for long GPU runs)
    # Checkpoints (pair/checkpoints/) to resume from: at the end of every N epochs and every M minutes.
    checkpoint_every_epochs: int = 1  # 0: only the time rule and the final one
    checkpoint_every_minutes: float = 10.0  # 0: only the epoch rule and the final one
    keep_checkpoints: int = 2  # the newest ones kept: an unreadable newest falls back to the previous


@dataclass
class EvalConfig:
    """Frozen-feature evaluation. Defaults: the DINO k-NN protocol and a linear probe with an lr sweep."""

    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_headline_k: int = 20
    knn_temperature: float = 0.07
    # true or probe: the fast probe on cached features | paper: the DINO paper's linear evaluation
    # (augmented images through the frozen network, SGD, an lr sweep) | false: none
    linear: bool | str = True
    linear_epochs: int = 100
    linear_lrs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    linear_val_fraction: float = 0.1
    linear_paper_epochs: int = 100  # eval.linear=paper: the reference's eval_linear.py --epochs
    linear_paper_batch_size: int = 1024  # its 128 per GPU on 8 GPUs
    linear_paper_lrs: list[float] | None = None  # None: the protocol's own sweep
    # Low-shot protocols on the same features: "1%", "10%" (balanced, seeded), "N/class" (k-NN), "file:PATH"
    low_shot: list[str] = field(default_factory=list)
    bootstrap_resamples: int = 1000  # 95% intervals over the test images; 0: none
    dataset: str | None = None  # evaluate on another dataset than the pretraining one (--eval-dataset)
    data_root: str | None = None  # where that dataset lives
    train_per_class: int | None = None  # feature bank: a balanced subset of the training split
    test_per_class: int | None = None
    batch_size: int = 256
    # Online monitoring: a cheap k-NN of student and teacher on a fixed subset every N epochs (0: off).
    monitor_every: int = 1
    monitor_bank_per_class: int = 20
    monitor_test_per_class: int = 10
    cache_features: bool = True  # keep the frozen features beside the weights (features-<hash>.pt)
    precision: str = "auto"  # feature extraction: auto (fp32 on CUDA, else the training one) | fp32 | bf16


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: ["dino", "byol"])
    archs: list[str] = field(default_factory=lambda: ["vit_s16"])
    dataset: str = "embedded"  # embedded | cifar10 | imagefolder:PATH
    data_root: str | None = None
    download: bool = False
    # None: the dataset's own (32 CIFAR, 96 STL-10, 64 Tiny ImageNet, 224 ImageNet; an image folder's own
    # size up to 64 px, else 224)
    image_size: int | None = None
    bad_images: str = "error"  # an unreadable image file: error (naming it) | skip (checked at load, counted)
    preset: str = "quick"
    recipe: str = "shared"  # shared: one schedule for all; paper: each method's published recipe
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # repeat every pair with each seed (--seeds); empty: seed
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trackers: list[str] = field(default_factory=list)  # --log: tensorboard, mlflow, wandb (offline)
    out: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Per-method hyper-parameters, written as top-level sections named after the method (``dino:``).
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is tuple:
        args = typing.get_args(hint)
        return (
            isinstance(value, list | tuple)
            and len(value) == len(args)
            and all(_type_ok(v, a) for v, a in zip(value, args, strict=True))
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Validate ``data`` against dataclass ``cls``; nested dataclasses recurse."""
    if not isinstance(data, dict):
        raise SSLBenchError(f"config section '{where or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise SSLBenchError(unknown_key_message(path, [f"{where}.{k}" if where else k for k in fields]))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, path)
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        if not _type_ok(value, hint):
            raise SSLBenchError(f"config key '{path}' must be {_type_name(hint)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def unknown_key_message(path: str, valid: list[str]) -> str:
    """Suggest by the last part of the key, so a shared ``train.`` prefix does not count as a match."""
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in valid}
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
    hint = f"; did you mean '{by_leaf[close[0]]}'?" if close else ""
    return f"unknown config key '{path}'{hint} (valid keys here: {', '.join(sorted(valid))})"


def check_values(config: RunConfig) -> None:
    """Values a type cannot rule out, caught before anything trains rather than after an hour of it."""
    train, evaluation = config.train, config.eval
    positive = {
        "train.epochs": train.epochs,
        "train.batch_size": train.batch_size,
        "train.log_every": train.log_every,
        "eval.batch_size": evaluation.batch_size,
        "eval.linear_epochs": evaluation.linear_epochs,
        "eval.linear_paper_epochs": evaluation.linear_paper_epochs,
        "eval.linear_paper_batch_size": evaluation.linear_paper_batch_size,
        "eval.knn_temperature": evaluation.knn_temperature,
    }
    for key, value in positive.items():
        if value <= 0:
            raise SSLBenchError(f"config key '{key}' must be positive, got {value}")
    for key, values in (("eval.knn_k", evaluation.knn_k), ("eval.linear_lrs", evaluation.linear_lrs)):
        if not values or min(values) <= 0:
            raise SSLBenchError(
                f"config key '{key}' must be a non-empty list of positive numbers, got {values}"
            )
    if evaluation.knn_headline_k not in evaluation.knn_k:
        raise SSLBenchError(
            f"config key 'eval.knn_headline_k' ({evaluation.knn_headline_k}) must be one of eval.knn_k "
            f"({evaluation.knn_k})"
        )
    if not 0.0 < evaluation.linear_val_fraction < 1.0:
        raise SSLBenchError(
            f"config key 'eval.linear_val_fraction' must be in (0, 1), got {evaluation.linear_val_fraction}"
        )
    if evaluation.bootstrap_resamples < 0:
        raise SSLBenchError(
            f"config key 'eval.bootstrap_resamples' must be 0 (no intervals) or more, got "
            f"{evaluation.bootstrap_resamples}"
        )
    if linear_kind(evaluation.linear) not in ("probe", "paper", None):
        raise SSLBenchError(
            f"config key 'eval.linear' must be true (the fast probe), probe, paper (the DINO paper's "
            f"protocol) or false, got '{evaluation.linear}'"
        )
    if len(set(config.seeds)) != len(config.seeds):
        raise SSLBenchError(f"config key 'seeds' repeats a seed: {config.seeds}")
    check_choices(config)


def linear_kind(linear: bool | str) -> str | None:
    """``eval.linear`` as a protocol name: "probe" (the fast probe), "paper", or None (no linear)."""
    if linear is True:
        return "probe"
    return None if linear is False else str(linear)


def check_choices(config: RunConfig) -> None:
    """Keys that take one of a few words: a wrong word is caught before anything trains."""
    choices = {
        "train.optimizer": (config.train.optimizer, OPTIMIZERS),
        "train.precision": (config.train.precision, PRECISIONS),
        "eval.precision": (config.eval.precision, PRECISIONS),
        "train.augment_on": (config.train.augment_on, ("cpu", "gpu")),
        "recipe": (config.recipe, ("shared", "paper")),
        "bad_images": (config.bad_images, ("error", "skip")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            close = difflib.get_close_matches(value, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SSLBenchError(f"config key '{key}' must be one of {', '.join(valid)}, got '{value}'{hint}")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    options = data.pop("method_options")
    data.update(options)
    return data


def config_hash(payload: dict[str, Any]) -> str:
    """A short, stable hash of what determines a number (for the protocol record)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
