"""Evaluation on frozen features: weighted k-NN and a linear probe.

Features are extracted once per trained model and shared by both evaluators, so neither ever runs the
backbone; everything here works on cached ``(N, D)`` tensors kept on the CPU unless a device is given.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from sslbench.atomic_io import atomic_path
from sslbench.augment import build_eval_transform
from sslbench.backbones import Backbone
from sslbench.config import RunConfig, config_hash
from sslbench.datasets import DatasetSplits, SubsetSource, TransformDataset, make_loader, subset_indices
from sslbench.errors import SSLBenchError
from sslbench.method import Method

_EVAL_CHUNK = 8192  # rows scored at once by the linear probe; bounds memory on large test sets


@torch.no_grad()
def extract_features(
    encode: Callable[[Tensor], dict[str, Tensor]],
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], Tensor]:
    """Run ``encode`` (already in eval mode) over ``loader`` once and cache every feature kind it returns.

    One pass serves both evaluators (e.g. ``{"knn": (B, D1), "linear": (B, D2)}``). Features come back as
    float32 on the CPU, concatenated in loader order, with int64 labels.
    """
    chunks: dict[str, list[Tensor]] = {}
    label_chunks: list[Tensor] = []
    for images, labels in loader:
        labels = torch.as_tensor(labels).reshape(-1)
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


def _check_split(features: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
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


def _check_widths(train_features: Tensor, test_features: Tensor) -> None:
    """Features from two different heads would otherwise fail deep inside a matmul."""
    if train_features.shape[1] != test_features.shape[1]:
        raise SSLBenchError(
            f"train/test feature widths differ: {train_features.shape[1]} vs {test_features.shape[1]}"
        )


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Weighted k-NN top-1 accuracy (%) per k, as DINO's ``eval_knn.py`` (Wu et al. 2018).

    Both sets are L2-normalised; each of the top-k training neighbours (by cosine similarity) votes for its
    label with weight ``exp(sim / T)`` and the class with the largest summed vote wins. The top ``max(ks)``
    neighbours are found once per chunk of test rows (the full test x train matrix is never built) and
    sliced for smaller k, which is valid because ``topk`` is sorted. A k above the training-set size is
    clamped to it, i.e. every training sample votes.
    """
    if not ks or min(ks) < 1:
        raise SSLBenchError(f"k-NN needs at least one k >= 1; got {list(ks)}")
    if temperature <= 0 or chunk_size < 1:
        raise SSLBenchError(
            f"k-NN needs temperature > 0 and chunk_size >= 1; got {temperature}, {chunk_size}"
        )
    _check_split(train_features, train_labels, num_classes, "train")
    _check_split(test_features, test_labels, num_classes, "test")
    _check_widths(train_features, test_features)

    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    train_y = train_labels.to(device, torch.long)
    n_train = train.shape[0]
    k_max = min(max(ks), n_train)
    correct = {k: 0 for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)
        target = test_labels[start : start + chunk_size].to(device, torch.long)
        sims, idx = (query @ train.T).topk(k_max, dim=1, largest=True, sorted=True)
        neighbour_y = train_y[idx]  # (B, k_max)
        weights = (sims / temperature).exp()
        for k in correct:
            k_eff = min(k, n_train)
            votes = torch.zeros(query.shape[0], num_classes, device=query.device)
            votes.scatter_add_(1, neighbour_y[:, :k_eff], weights[:, :k_eff])
            correct[k] += int((votes.argmax(dim=1) == target).sum())
    n_test = test_features.shape[0]
    return {k: 100.0 * c / n_test for k, c in correct.items()}


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; ``val_top1`` is kept so a report can show how flat the sweep was."""

    top1: float  # test top-1 %, of the probe retrained on the full train split with the chosen lr
    best_lr: float
    val_top1: dict[float, float] = field(default_factory=dict)  # held-out accuracy per lr in the sweep


def _holdout_split(labels: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Seeded split, stratified so every class with two or more samples lands in both parts.

    With very small classes every per-class share rounds to zero; a random split of the same fraction
    (at least one sample) then still gives the lr sweep something to score.
    """
    fit_idx: list[Tensor] = []
    val_idx: list[Tensor] = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = min(round(val_fraction * members.numel()), members.numel() - 1)
        val_idx.append(members[:n_val])
        fit_idx.append(members[n_val:])
    fit, val = torch.cat(fit_idx), torch.cat(val_idx)
    if val.numel() == 0 and labels.numel() >= 2:
        order = torch.randperm(labels.numel(), generator=generator)
        n_val = min(max(1, round(val_fraction * labels.numel())), labels.numel() - 1)
        val, fit = order[:n_val], order[n_val:]
    return fit.sort().values, val.sort().values


def _accuracy(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor) -> float:
    """Top-1 % scored in chunks, so a large test split never materialises all logits at once."""
    correct = 0
    for start in range(0, features.shape[0], _EVAL_CHUNK):
        logits = features[start : start + _EVAL_CHUNK] @ weight.T + bias
        correct += int((logits.argmax(dim=1) == labels[start : start + _EVAL_CHUNK]).sum())
    return 100.0 * correct / features.shape[0]


def _train_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """SGD (momentum 0.9, PyTorch's update rule) with per-step cosine decay to zero.

    The softmax cross-entropy gradient of a linear layer is written in closed form, so the probe needs no
    autograd (it works under ``no_grad``) and no optimizer object. A fresh seeded generator per call makes
    every lr in the sweep start from the same init and see the same batch order.
    """
    generator = torch.Generator().manual_seed(seed)
    dev = features.device
    weight = (torch.randn(num_classes, features.shape[1], generator=generator) * 0.01).to(dev)
    bias = torch.zeros(num_classes, device=dev)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    n = features.shape[0]
    total_steps = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(dev)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            x = features[batch]
            # d(mean CE)/d(logits) = (softmax - onehot) / B
            grad = torch.softmax(x @ weight.T + bias, dim=1)
            grad[torch.arange(batch.numel(), device=dev), labels[batch]] -= 1.0
            grad /= batch.numel()
            grad_w = grad.T @ x + weight_decay * weight
            grad_b = grad.sum(dim=0) + weight_decay * bias
            buf_w.mul_(0.9).add_(grad_w)
            buf_b.mul_(0.9).add_(grad_b)
            step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            weight.sub_(step_lr * buf_w)
            bias.sub_(step_lr * buf_b)
            step += 1
    return weight, bias


@torch.no_grad()
def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = (0.01, 0.1, 1.0),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Linear classifier on frozen, cached features, with the lr chosen on a held-out part of train.

    Features are standardised with the train split's per-dimension mean/std: an affine map leaves linear
    separability unchanged but lets one lr sweep suit every method's feature scale. Each lr is trained on a
    stratified, seeded ``1 - val_fraction`` part of train and scored on the rest; the best (ties go to the
    smaller lr) is retrained on all of train and scored on test. Deterministic for a given seed.
    """
    if not lrs or min(lrs) <= 0:
        raise SSLBenchError(f"linear probe needs at least one lr > 0; got {list(lrs)}")
    if epochs < 1 or batch_size < 1 or not 0.0 <= val_fraction < 1.0:
        raise SSLBenchError(
            f"linear probe needs epochs >= 1, batch_size >= 1 and 0 <= val_fraction < 1; "
            f"got {epochs}, {batch_size}, {val_fraction}"
        )
    _check_split(train_features, train_labels, num_classes, "train")
    _check_split(test_features, test_labels, num_classes, "test")
    _check_widths(train_features, test_features)

    train_x = train_features.to(device, torch.float32)
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False)
    # a constant dimension is only centred: dividing by ~0 would blow up test features
    std = torch.where(std > 1e-8 * (1.0 + mean.abs()), std, torch.ones_like(std))
    train_x = (train_x - mean) / std
    test_x = (test_features.to(device, torch.float32) - mean) / std
    train_y = train_labels.to(device, torch.long)
    test_y = test_labels.to(device, torch.long)
    hyper = {"epochs": epochs, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed}

    sweep = sorted(set(float(lr) for lr in lrs))
    val_top1: dict[float, float] = {}
    if len(sweep) == 1 and val_fraction == 0.0:
        best_lr = sweep[0]  # nothing to choose between, so no held-out part is needed
    else:
        split_gen = torch.Generator().manual_seed(seed)
        fit_idx, val_idx = _holdout_split(train_labels.long().cpu(), val_fraction, split_gen)
        if val_fraction == 0.0 or val_idx.numel() == 0:
            raise SSLBenchError(
                f"val_fraction={val_fraction} with {train_labels.numel()} training samples leaves nothing "
                "held out to choose an lr; raise val_fraction or pass a single lr"
            )
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        for lr in sweep:
            weight, bias = _train_probe(train_x[fit_idx], train_y[fit_idx], num_classes, lr, **hyper)
            val_top1[lr] = _accuracy(weight, bias, train_x[val_idx], train_y[val_idx])
        best_lr = max(sweep, key=lambda lr: (val_top1[lr], -lr))
    weight, bias = _train_probe(train_x, train_y, num_classes, best_lr, **hyper)
    return LinearProbeResult(top1=_accuracy(weight, bias, test_x, test_y), best_lr=best_lr, val_top1=val_top1)


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
) -> dict[str, tuple[dict[str, Tensor], Tensor]]:
    """Each split's features, extracted once per set of weights and kept in ``cache_dir``.

    The file name holds a hash of the weights and of what selects and transforms the images, so a
    changed checkpoint or protocol never reads stale features; files load with ``weights_only=True``.
    """
    path = None
    if cache_dir is not None:
        key = config_hash({"weights": weights_digest(backbone), **protocol})
        path = cache_dir / f"features-{key}.pt"
        if path.exists():
            stored = torch.load(path, weights_only=True)
            return {split: (stored[split]["features"], stored[split]["labels"]) for split in loaders}
    features = {
        split: extract_features(backbone.forward_eval, loader, device) for split, loader in loaders.items()
    }
    if path is not None:
        payload = {split: {"features": f, "labels": y} for split, (f, y) in features.items()}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    return features


def evaluate_method(
    method: Method,
    config: RunConfig,
    data: DatasetSplits,
    device: torch.device,
    cache_dir: Path | None = None,
) -> dict:
    """Extract frozen features once (no augmentation; cached in ``cache_dir`` per set of weights), then
    k-NN and the linear probe on them."""
    eval_cfg = config.eval
    per_class = {"bank": eval_cfg.train_per_class, "test": eval_cfg.test_per_class}
    loaders = eval_loaders(data, config, device, per_class, config.train.num_workers)
    backbone = method.eval_backbone()
    method.eval()
    protocol = {"dataset": data.name, "size": data.image_size, "per_class": per_class, "seed": config.seed}
    features = cached_features(backbone, loaders, device, cache_dir, protocol)
    (bank_feats, bank_labels), (test_feats, test_labels) = features["bank"], features["test"]
    knn = knn_classify(
        bank_feats["knn"],
        bank_labels,
        test_feats["knn"],
        test_labels,
        data.num_classes,
        ks=eval_cfg.knn_k,
        temperature=eval_cfg.knn_temperature,
        device=device,
    )
    linear = None
    if eval_cfg.linear:
        result = linear_probe(
            bank_feats["linear"],
            bank_labels,
            test_feats["linear"],
            test_labels,
            data.num_classes,
            lrs=eval_cfg.linear_lrs,
            epochs=eval_cfg.linear_epochs,
            val_fraction=eval_cfg.linear_val_fraction,
            seed=config.seed,
            device=device,
        )
        linear = {
            "top1": round(result.top1, 2),
            "best_lr": result.best_lr,
            "val_top1": {str(k): round(v, 2) for k, v in result.val_top1.items()},
        }
    return {
        "knn": {str(k): round(v, 2) for k, v in knn.items()},
        "linear": linear,
        "bank_images": len(loaders["bank"].dataset),
        "test_images": len(loaders["test"].dataset),
    }
