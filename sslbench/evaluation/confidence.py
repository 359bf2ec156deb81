"""95% intervals on a top-1 accuracy: how far the number could move with another test set of the same size.

The test set is a sample of the images a method will meet, so its top-1 is an estimate. At the quick
scale (a few hundred or thousand test images) two methods a point apart are often indistinguishable,
and the interval is what says so. The method is the percentile bootstrap (Efron & Tibshirani 1993,
*An Introduction to the Bootstrap*, ch. 13): resample the test images with replacement, recompute top-1,
and read the interval off the resampled accuracies' percentiles. It covers test-set sampling only: a
different training seed or a different feature bank moves the number too, and no interval here
includes that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from sslbench.base.errors import SSLBenchError

# indices drawn at once: 1000 resamples of 50,000 test images are 5e7 draws, taken ~4M (32 MB) at a time
_INDICES_PER_CHUNK = 1 << 22


def _as_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def bootstrap_interval(
    correct: Tensor | np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval (low, high) of top-1 % from one bool per test image (right or not).

    Each resample draws ``len(correct)`` test images with replacement; resample r uses the r-th block of
    ``len(correct)`` draws of ``np.random.default_rng(seed).integers``, drawn a chunk of resamples at a
    time to bound memory, so the result is deterministic for a seed and equal to a one-resample-at-a-time
    loop. The bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles (numpy's linear
    interpolation) of the resampled accuracies.
    """
    hits = _as_numpy(correct)
    if hits.ndim != 1 or hits.size == 0:
        raise SSLBenchError(f"bootstrap needs one right/wrong value per test image; got shape {hits.shape}")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise SSLBenchError(f"bootstrap needs resamples >= 1 and 0 < level < 1; got {resamples}, {level}")
    hits = hits.astype(bool)
    n = hits.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _INDICES_PER_CHUNK // n)
    accuracies = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows_per_chunk):
        rows = min(rows_per_chunk, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n))
        accuracies[start : start + rows] = 100.0 * hits[drawn].sum(axis=1) / n
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(accuracies, [tail, 100.0 - tail])
    return float(low), float(high)


def accuracy_record(
    predictions: Tensor | np.ndarray, labels: Tensor | np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``{"top1": 87.25, "ci95": [85.1, 89.3]}``: top-1 % and its 95% bootstrap interval, rounded to 2
    decimals as eval.json keeps every accuracy."""
    predicted, target = _as_numpy(predictions), _as_numpy(labels)
    if predicted.shape != target.shape or predicted.ndim != 1:
        raise SSLBenchError(
            f"accuracy needs one prediction per label; got shapes {predicted.shape} and {target.shape}"
        )
    correct = predicted == target
    low, high = bootstrap_interval(correct, resamples=resamples, level=0.95, seed=seed)
    top1 = 100.0 * int(correct.sum()) / max(correct.size, 1)
    return {"top1": round(top1, 2), "ci95": [round(low, 2), round(high, 2)]}
