"""Per-image predictions of the evaluators and the percentile-bootstrap interval built on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.confidence import accuracy_record, bootstrap_interval
from sslbench.evaluation.knn import knn_classify, knn_predictions
from sslbench.evaluation.linear_probe import linear_probe


def _noisy_clusters(
    n: int, num_classes: int = 4, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping clusters, so the k-NN gets a fair share wrong and the ks disagree."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    feats = torch.eye(num_classes, dim)[labels] * 1.5 + torch.randn(n, dim, generator=g)
    return feats, labels


def _reference_interval(correct: np.ndarray, resamples: int, level: float, seed: int) -> tuple[float, float]:
    """The percentile bootstrap one resample at a time: n test images drawn with replacement."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    accuracies = []
    for _ in range(resamples):
        drawn = rng.integers(0, n, size=n)
        accuracies.append(100.0 * sum(bool(correct[i]) for i in drawn) / n)
    tail = 100.0 * (1.0 - level) / 2.0
    return float(np.percentile(accuracies, tail)), float(np.percentile(accuracies, 100.0 - tail))


def test_knn_predictions_agree_with_knn_classify() -> None:
    train_x, train_y = _noisy_clusters(300, seed=0)
    test_x, test_y = _noisy_clusters(150, seed=1)
    ks = (1, 5, 20, 500)  # 500 > the bank: every training sample votes
    predictions = knn_predictions(train_x, train_y, test_x, 4, ks=ks, temperature=0.07, chunk_size=64)
    accuracy = knn_classify(train_x, train_y, test_x, test_y, 4, ks=ks, temperature=0.07)
    assert set(predictions) == set(ks)
    for k, predicted in predictions.items():
        assert predicted.dtype == torch.int64 and predicted.device.type == "cpu"
        assert predicted.shape == test_y.shape
        assert 100.0 * (predicted == test_y).sum().item() / test_y.numel() == accuracy[k]
    assert 40.0 < accuracy[5] < 100.0  # hard enough that the predictions carry information


def test_knn_predictions_reject_bad_test_features() -> None:
    x, y = _noisy_clusters(20)
    with pytest.raises(SSLBenchError, match="widths differ"):
        knn_predictions(x, y, torch.randn(5, 3), 4, ks=(1,), temperature=0.07)
    with pytest.raises(SSLBenchError, match="non-empty"):
        knn_predictions(x, y, torch.randn(0, 8), 4, ks=(1,), temperature=0.07)


def test_linear_probe_returns_its_test_predictions() -> None:
    train_x, train_y = _noisy_clusters(200, seed=2)
    test_x, test_y = _noisy_clusters(100, seed=3)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, lrs=(0.1, 1.0), epochs=5, batch_size=64)
    assert result.test_predictions is not None
    assert result.test_predictions.dtype == torch.int64 and result.test_predictions.shape == test_y.shape
    assert 100.0 * (result.test_predictions == test_y).sum().item() / 100 == result.top1


@pytest.mark.parametrize(("n", "level", "seed"), [(37, 0.95, 0), (200, 0.9, 3)])
def test_bootstrap_matches_a_one_resample_at_a_time_reference(n: int, level: float, seed: int) -> None:
    correct = np.random.default_rng(100 + n).random(n) < 0.7
    got = bootstrap_interval(correct, resamples=300, level=level, seed=seed)
    assert got == pytest.approx(_reference_interval(correct, 300, level, seed), abs=1e-9)


def test_bootstrap_chunks_do_not_change_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import sslbench.evaluation.confidence as confidence

    correct = np.random.default_rng(5).random(101) < 0.4
    whole = bootstrap_interval(correct, resamples=250, seed=1)
    monkeypatch.setattr(confidence, "_INDICES_PER_CHUNK", 101 * 7)  # 7 resamples per chunk, a ragged end
    assert bootstrap_interval(correct, resamples=250, seed=1) == whole


def test_bootstrap_covers_the_accuracy_narrows_with_more_images_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1000, 10000):
        correct = rng.random(n) < 0.8
        accuracy = 100.0 * correct.mean()
        low, high = bootstrap_interval(correct, resamples=500, seed=0)
        assert low < accuracy < high
        # the binomial standard error: the 95% interval is about +-1.96 of it
        half_width = 1.96 * 100.0 * np.sqrt(0.8 * 0.2 / n)
        assert (high - low) / 2 == pytest.approx(half_width, rel=0.2)
        widths.append(high - low)
        assert bootstrap_interval(correct, resamples=500, seed=0) == (low, high)
        assert bootstrap_interval(torch.from_numpy(correct), resamples=500, seed=0) == (low, high)
    assert widths[0] > widths[1] > widths[2]
    correct = rng.random(300) < 0.5
    assert bootstrap_interval(correct, resamples=200, seed=1) != bootstrap_interval(
        correct, resamples=200, seed=2
    )


def test_bootstrap_of_a_perfect_score_is_a_point_and_bad_input_is_one_line() -> None:
    assert bootstrap_interval(np.ones(50, dtype=bool), resamples=20) == (100.0, 100.0)
    with pytest.raises(SSLBenchError, match="one right/wrong value per test image"):
        bootstrap_interval(np.zeros(0, dtype=bool))
    with pytest.raises(SSLBenchError, match="resamples >= 1"):
        bootstrap_interval(np.ones(5, dtype=bool), resamples=0)
    with pytest.raises(SSLBenchError, match="0 < level < 1"):
        bootstrap_interval(np.ones(5, dtype=bool), level=1.0)


def test_accuracy_record_rounds_to_two_decimals() -> None:
    labels = torch.arange(3).repeat(100)[:299]  # 199 of 299 right: 66.555...% rounds to 66.56
    predictions = labels.clone()
    predictions[::3] = (predictions[::3] + 1) % 3
    correct = (predictions == labels).numpy()
    record = accuracy_record(predictions, labels, resamples=200, seed=4)
    assert set(record) == {"top1", "ci95"}
    assert record["top1"] == round(100.0 * correct.sum() / 299, 2) == 66.56
    low, high = bootstrap_interval(correct, resamples=200, seed=4)
    assert record["ci95"] == [round(low, 2), round(high, 2)]
    assert record["ci95"][0] < record["top1"] < record["ci95"][1]
    with pytest.raises(SSLBenchError, match="one prediction per label"):
        accuracy_record(predictions[:10], labels, resamples=10)
