"""Frozen features: extracted once per set of weights, cached beside them, and read by every evaluator.

Everything downstream works on ``(N, D)`` tensors kept on the CPU unless a device is given, so no
evaluator ever runs the backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sslbench.base.atomic_io import atomic_path
from sslbench.base.errors import SSLBenchError
from sslbench.base.precision import autocast_for, precision_choice
from sslbench.config import RunConfig, config_hash
from sslbench.data.augment import build_eval_transform
from sslbench.data.datasets import DatasetSplits, SubsetSource, TransformDataset, make_loader, subset_indices
from sslbench.models.backbones import Backbone


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], dict[str, Tensor]],
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[dict[str, Tensor], Tensor]:
    """Run ``encode`` (already in eval mode) over ``loader`` once and cache every feature kind it returns.

    One pass serves both evaluators (e.g. ``{"knn": (B, D1), "linear": (B, D2)}``). ``precision`` (fp32 |
    bf16) is the forward's autocast (``feature_precision``). Features come back as float32 on the CPU,
    concatenated in loader order, with int64 labels.
    """
    device = torch.device(device)
    chunks: dict[str, list[Tensor]] = {}
    label_chunks: list[Tensor] = []
    for images, labels in loader:
        labels = torch.as_tensor(labels).reshape(-1)
        with autocast_for(precision, device):
            out = encode(images.to(device, non_blocking=True))
        if chunks and set(out) != set(chunks):
            raise SSLBenchError(f"encode returned keys {sorted(out)} after {sorted(chunks)}; keep them fixed")
        for key, feats in out.items():
            if feats.shape[0] != labels.shape[0]:
                raise SSLBenchError(
                    f"encode returned {feats.shape[0]} '{key}' rows for a batch of {labels.shape[0]} labels"
                )
            chunks.setdefault(key, []).append(feats.detach().reshape(feats.shape[0], -1).float().cpu())
        label_chunks.append(labels.long().cpu())
    if not label_chunks:
        raise SSLBenchError("the feature loader yielded no batches; check the dataset split")
    return {key: torch.cat(parts) for key, parts in chunks.items()}, torch.cat(label_chunks)


def feature_precision(config: RunConfig, device: torch.device) -> tuple[str, str]:
    """(precision, why) of frozen-feature extraction: ``eval.precision``. Its ``auto`` is fp32 on CUDA,
    as the references extract features (and cheap there), and the training precision on other devices,
    where extraction is a third of a short run: bf16 features moved the quick preset's k-NN and linear
    top-1 by at most 0.6 points on 500 test images (same weights), a third of their binomial noise."""
    if config.eval.precision != "auto":
        return precision_choice(config.eval.precision, device)
    if device.type == "cuda":
        return "fp32", "auto: fp32 features on CUDA, as the references"
    precision, why = precision_choice(config.train.precision, device)
    return precision, f"the training precision ({why})"


def check_split(features: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
    """Catch shape and label-range mistakes early: an out-of-range label would otherwise scatter silently."""
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise SSLBenchError(
            f"{name} split: expected (N, D) features and (N,) labels, got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise SSLBenchError(f"{name} split is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise SSLBenchError(
            f"{name} labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}"
        )


def check_widths(train_features: Tensor, test_features: Tensor) -> None:
    """Features from two different heads would otherwise fail deep inside a matmul."""
    if train_features.shape[1] != test_features.shape[1]:
        raise SSLBenchError(
            f"train/test feature widths differ: {train_features.shape[1]} vs {test_features.shape[1]}"
        )


def eval_loaders(
    data: DatasetSplits,
    config: RunConfig,
    device: torch.device,
    per_class: dict[str, int | None],
    workers: int,
) -> dict[str, DataLoader]:
    """Un-augmented loaders over balanced, seeded subsets of the train ("bank") and test splits."""
    transform = build_eval_transform(data.image_size, data.mean, data.std)
    loaders = {}
    for split, source in (("bank", data.train), ("test", data.test)):
        subset = SubsetSource(source, subset_indices(source.labels, per_class[split], config.seed))
        dataset = TransformDataset(subset, transform)
        loaders[split] = make_loader(
            dataset, config.eval.batch_size, False, config.seed, workers, device, False
        )
    return loaders


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of a network's weights and buffers: the key of the features it produces."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_features(
    backbone: Backbone,
    loaders: dict[str, DataLoader],
    device: torch.device,
    cache_dir: Path | None,
    protocol: dict,
    precision: str = "fp32",
) -> dict[str, tuple[dict[str, Tensor], Tensor]]:
    """Each split's features, extracted once per set of weights and kept in ``cache_dir``.

    The file name holds a hash of the weights and of what selects and transforms the images, so a
    changed checkpoint or protocol never reads stale features; files load with ``weights_only=True``.
    """
    path = None
    if cache_dir is not None:
        key = config_hash({"weights": weights_digest(backbone), **protocol, "precision": precision})
        path = cache_dir / f"features-{key}.pt"
        if path.exists():
            stored = torch.load(path, weights_only=True)
            return {split: (stored[split]["features"], stored[split]["labels"]) for split in loaders}
    features = {
        split: extract_features(backbone.forward_eval, loader, device, precision)
        for split, loader in loaders.items()
    }
    if path is not None:
        payload = {split: {"features": f, "labels": y} for split, (f, y) in features.items()}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    return features
