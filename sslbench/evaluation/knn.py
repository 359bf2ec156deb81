"""Weighted k-NN on frozen features, the DINO protocol (Wu et al. 2018; Caron et al. 2021, Sec. 4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.features import check_split, check_widths


def _check_knn_settings(ks: Sequence[int], temperature: float, chunk_size: int) -> None:
    if not ks or min(ks) < 1:
        raise SSLBenchError(f"k-NN needs at least one k >= 1; got {list(ks)}")
    if temperature <= 0 or chunk_size < 1:
        raise SSLBenchError(
            f"k-NN needs temperature > 0 and chunk_size >= 1; got {temperature}, {chunk_size}"
        )


@torch.no_grad()
def knn_predictions(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Predicted label of every test row per k (CPU, int64), by DINO's weighted vote (``eval_knn.py``,
    ``knn_classifier``; Wu et al. 2018).

    Both sets are L2-normalised; each of the top-k training neighbours (by cosine similarity) votes for its
    label with weight ``exp(sim / T)`` and the class with the largest summed vote wins. The top ``max(ks)``
    neighbours are found once per chunk of test rows (the full test x train matrix is never built) and
    sliced for smaller k, which is valid because ``topk`` is sorted. A k above the training-set size is
    clamped to it, i.e. every training sample votes. Per-image predictions are what a confidence
    interval or a per-class breakdown needs; :func:`knn_classify` is their accuracy.
    """
    _check_knn_settings(ks, temperature, chunk_size)
    check_split(train_features, train_labels, num_classes, "train")
    if test_features.ndim != 2 or test_features.shape[0] == 0:
        raise SSLBenchError(
            f"test split: expected non-empty (N, D) features, got {tuple(test_features.shape)}"
        )
    check_widths(train_features, test_features)

    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    train_y = train_labels.to(device, torch.long)
    n_train = train.shape[0]
    k_max = min(max(ks), n_train)
    predicted: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)
        sims, idx = (query @ train.T).topk(k_max, dim=1, largest=True, sorted=True)
        neighbour_y = train_y[idx]  # (B, k_max)
        weights = (sims / temperature).exp()
        for k in predicted:
            k_eff = min(k, n_train)
            votes = torch.zeros(query.shape[0], num_classes, device=query.device)
            votes.scatter_add_(1, neighbour_y[:, :k_eff], weights[:, :k_eff])
            predicted[k].append(votes.argmax(dim=1).cpu())
    return {k: torch.cat(chunks).long() for k, chunks in predicted.items()}


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
    """Weighted k-NN top-1 accuracy (%) per k, as DINO's ``eval_knn.py``: the accuracy of
    :func:`knn_predictions` (same arguments, same vote)."""
    check_split(test_features, test_labels, num_classes, "test")  # knn_predictions checks the rest
    predicted = knn_predictions(
        train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size, device
    )
    target = test_labels.cpu().long()
    n_test = target.numel()
    return {k: 100.0 * int((labels == target).sum()) / n_test for k, labels in predicted.items()}
