"""A linear classifier on frozen, standardised features, with its learning rate chosen on held-out data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.features import check_split, check_widths

_EVAL_CHUNK = 8192  # rows scored at once by the linear probe; bounds memory on large test sets


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; ``val_top1`` is kept so a report can show how flat the sweep was."""

    top1: float  # test top-1 %, of the probe retrained on the full train split with the chosen lr
    best_lr: float
    val_top1: dict[float, float] = field(default_factory=dict)  # held-out accuracy per lr in the sweep
    # the retrained probe's label for every test row (CPU, int64): what a confidence interval resamples;
    # left out of == and repr, which compare and show the numbers
    test_predictions: Tensor | None = field(default=None, compare=False, repr=False)


def holdout_split(labels: Tensor, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
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


def _predict(weight: Tensor, bias: Tensor, features: Tensor) -> Tensor:
    """Predicted labels scored in chunks, so a large test split never materialises all logits at once."""
    chunks = [
        (features[start : start + _EVAL_CHUNK] @ weight.T + bias).argmax(dim=1)
        for start in range(0, features.shape[0], _EVAL_CHUNK)
    ]
    return torch.cat(chunks)


def _accuracy(predicted: Tensor, labels: Tensor) -> float:
    return 100.0 * int((predicted == labels).sum()) / labels.shape[0]


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
    check_split(train_features, train_labels, num_classes, "train")
    check_split(test_features, test_labels, num_classes, "test")
    check_widths(train_features, test_features)

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
        fit_idx, val_idx = holdout_split(train_labels.long().cpu(), val_fraction, split_gen)
        if val_fraction == 0.0 or val_idx.numel() == 0:
            raise SSLBenchError(
                f"val_fraction={val_fraction} with {train_labels.numel()} training samples leaves nothing "
                "held out to choose an lr; raise val_fraction or pass a single lr"
            )
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        for lr in sweep:
            weight, bias = _train_probe(train_x[fit_idx], train_y[fit_idx], num_classes, lr, **hyper)
            val_top1[lr] = _accuracy(_predict(weight, bias, train_x[val_idx]), train_y[val_idx])
        best_lr = max(sweep, key=lambda lr: (val_top1[lr], -lr))
    weight, bias = _train_probe(train_x, train_y, num_classes, best_lr, **hyper)
    predicted = _predict(weight, bias, test_x)
    return LinearProbeResult(
        top1=_accuracy(predicted, test_y),
        best_lr=best_lr,
        val_top1=val_top1,
        test_predictions=predicted.cpu().long(),
    )
