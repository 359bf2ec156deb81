"""Frozen-feature evaluators: k-NN against a brute-force reference, linear probe behaviour, extraction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.features import extract_features
from sslbench.evaluation.knn import knn_classify
from sslbench.evaluation.linear_probe import LinearProbeResult, _train_probe, holdout_split, linear_probe


def _clusters(n_per_class: int, num_classes: int = 5, dim: int = 16, spread: float = 0.5, seed: int = 0):
    """Well-separated Gaussian clusters around scaled basis vectors, shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    centres = torch.eye(num_classes, dim) * 6.0
    feats = centres[labels] + spread * torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return feats[perm], labels[perm]


def _brute_force_knn(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> float:
    """The weighted k-NN rule written out one test sample at a time."""
    train_n = [row / row.norm() for row in train_x.double()]
    correct = 0
    for x, y in zip(test_x.double(), test_y.tolist(), strict=True):
        x = x / x.norm()
        sims = sorted(
            ((float(x @ t), int(lbl)) for t, lbl in zip(train_n, train_y, strict=True)), reverse=True
        )
        votes = [0.0] * num_classes
        for sim, lbl in sims[:k]:
            votes[lbl] += math.exp(sim / temperature)
        correct += int(max(range(num_classes), key=lambda c: votes[c]) == y)
    return 100.0 * correct / len(test_y)


def test_knn_separable_clusters_are_perfect() -> None:
    train_x, train_y = _clusters(100, seed=0)
    test_x, test_y = _clusters(40, seed=1)
    acc = knn_classify(train_x, train_y, test_x, test_y, num_classes=5, ks=(1, 10, 20, 100, 200))
    assert set(acc) == {1, 10, 20, 100, 200}
    assert all(a == 100.0 for a in acc.values()), acc


def test_knn_matches_brute_force_with_chunking_and_clamped_k() -> None:
    g = torch.Generator().manual_seed(3)
    num_classes, n_train, n_test = 4, 60, 37
    train_x = torch.randn(n_train, 8, generator=g)
    train_y = torch.randint(0, num_classes, (n_train,), generator=g)
    test_x = torch.randn(n_test, 8, generator=g)
    test_y = torch.randint(0, num_classes, (n_test,), generator=g)
    ks = (1, 3, 7, 20, 60, 500)  # 500 > n_train: clamped, every training sample votes
    for temperature in (0.07, 0.5):
        got = knn_classify(
            train_x, train_y, test_x, test_y, num_classes, ks=ks, temperature=temperature, chunk_size=10
        )
        for k in ks:
            want = _brute_force_knn(
                train_x, train_y, test_x, test_y, num_classes, min(k, n_train), temperature
            )
            assert got[k] == pytest.approx(want), (k, temperature)
    # the result cannot depend on how the test rows are chunked
    assert knn_classify(train_x, train_y, test_x, test_y, num_classes, ks=ks, chunk_size=1) == knn_classify(
        train_x, train_y, test_x, test_y, num_classes, ks=ks, chunk_size=4096
    )


def test_knn_ignores_feature_scale() -> None:
    """Cosine similarity: rescaling rows must not change anything."""
    g = torch.Generator().manual_seed(5)
    train_x, test_x = torch.randn(50, 6, generator=g), torch.randn(20, 6, generator=g)
    train_y, test_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)
    scales = torch.rand(50, 1, generator=g) * 100 + 0.01
    assert knn_classify(train_x * scales, train_y, test_x, test_y, 3, ks=(5, 10)) == knn_classify(
        train_x, train_y, test_x, test_y, 3, ks=(5, 10)
    )


def test_knn_temperature_weights_the_votes() -> None:
    """One very close neighbour of class 0 against two farther ones of class 1: weighting decides."""
    train_x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])  # cos 1, 0.5, 0.5
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    sharp = knn_classify(train_x, train_y, test_x, test_y, 2, ks=(1, 3), temperature=0.07)
    flat = knn_classify(train_x, train_y, test_x, test_y, 2, ks=(1, 3), temperature=1000.0)
    assert sharp == {1: 100.0, 3: 100.0}  # exp(1/0.07) outweighs 2 * exp(0.5/0.07)
    assert flat == {1: 100.0, 3: 0.0}  # near-uniform weights: the majority (class 1) wins


def test_knn_rejects_bad_input() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(SSLBenchError):
        knn_classify(x, y, x, y, 2, ks=())
    with pytest.raises(SSLBenchError):
        knn_classify(x, y, x, torch.tensor([0, 1, 2, 1]), 2)
    with pytest.raises(SSLBenchError):
        knn_classify(x, y, torch.randn(4, 5), y, 2)


def test_linear_probe_separable_data() -> None:
    train_x, train_y = _clusters(60, spread=1.0, seed=0)
    test_x, test_y = _clusters(30, spread=1.0, seed=1)
    res = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=30, seed=0)
    assert isinstance(res, LinearProbeResult)
    assert res.top1 >= 99.0
    assert res.best_lr in (0.01, 0.1, 1.0)
    assert set(res.val_top1) == {0.01, 0.1, 1.0}
    assert res.val_top1[res.best_lr] == max(res.val_top1.values())
    # ties go to the smaller lr
    assert res.best_lr == min(lr for lr, acc in res.val_top1.items() if acc == res.val_top1[res.best_lr])


def test_probe_step_matches_autograd_cross_entropy() -> None:
    """One full-batch step (momentum buffer = gradient, cosine factor 1) is plain SGD on mean CE + L2."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    lr, wd, seed = 0.3, 0.01, 4
    weight, bias = _train_probe(x, y, 3, lr, epochs=1, batch_size=64, weight_decay=wd, seed=seed)
    w0 = (torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)) * 0.01).requires_grad_()
    b0 = torch.zeros(3, requires_grad=True)
    loss = F.cross_entropy(x @ w0.T + b0, y) + 0.5 * wd * (w0.square().sum() + b0.square().sum())
    loss.backward()
    assert torch.allclose(weight, w0.detach() - lr * w0.grad, atol=1e-6)
    assert torch.allclose(bias, b0.detach() - lr * b0.grad, atol=1e-6)


def test_linear_probe_random_labels_is_near_chance() -> None:
    g = torch.Generator().manual_seed(7)
    train_x, test_x = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    train_y = torch.randint(0, 10, (600,), generator=g)
    test_y = torch.randint(0, 10, (600,), generator=g)
    res = linear_probe(train_x, train_y, test_x, test_y, num_classes=10, epochs=20, seed=0)
    assert res.top1 < 20.0  # chance is 10 %
    assert all(acc < 30.0 for acc in res.val_top1.values())


def test_linear_probe_is_deterministic() -> None:
    g = torch.Generator().manual_seed(11)
    train_x, test_x = torch.randn(300, 12, generator=g), torch.randn(200, 12, generator=g)
    w = torch.randn(12, 3, generator=g)
    train_y, test_y = (train_x @ w).argmax(1), (test_x @ w).argmax(1)
    train_y[:60] = torch.randint(0, 3, (60,), generator=g)  # some label noise so the lrs differ
    kwargs = {"num_classes": 3, "epochs": 15, "batch_size": 32}
    a = linear_probe(train_x, train_y, test_x, test_y, seed=1, **kwargs)
    b = linear_probe(train_x, train_y, test_x, test_y, seed=1, **kwargs)
    assert a == b
    assert a.top1 > 80.0


def test_linear_probe_is_invariant_to_feature_scale() -> None:
    """Standardisation makes a 1000x dimension look like any other to the shared lr sweep."""
    train_x, train_y = _clusters(60, spread=1.0, seed=0)
    test_x, test_y = _clusters(30, spread=1.0, seed=1)
    scale = torch.ones(16)
    scale[::2] = 1000.0
    plain = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=30)
    scaled = linear_probe(train_x * scale, train_y, test_x * scale, test_y, num_classes=5, epochs=30)
    big = linear_probe(
        train_x * 1000.0 + 500.0, train_y, test_x * 1000.0 + 500.0, test_y, num_classes=5, epochs=30
    )
    assert scaled.top1 >= 99.0 and big.top1 >= 99.0
    assert scaled.best_lr == plain.best_lr == big.best_lr
    assert scaled.top1 == pytest.approx(plain.top1, abs=1.0)


def test_linear_probe_single_lr_without_holdout_and_bad_input() -> None:
    train_x, train_y = _clusters(20, spread=1.0, seed=0)
    res = linear_probe(
        train_x, train_y, train_x, train_y, num_classes=5, lrs=(0.1,), epochs=10, val_fraction=0.0
    )
    assert res.best_lr == 0.1 and res.val_top1 == {} and res.top1 >= 99.0
    with pytest.raises(SSLBenchError):
        linear_probe(train_x, train_y, train_x, train_y, num_classes=5, val_fraction=0.0)
    with pytest.raises(SSLBenchError):
        linear_probe(train_x, train_y, train_x, train_y, num_classes=5, lrs=())


def test_holdout_split_is_stratified_and_falls_back_for_tiny_classes() -> None:
    labels = torch.arange(4).repeat_interleave(20)
    fit, val = holdout_split(labels, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([fit, val]).sort().values, torch.arange(80))
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 2, 2, 2]
    tiny = torch.arange(10).repeat_interleave(4)  # 0.1 * 4 rounds to 0 in every class
    fit, val = holdout_split(tiny, 0.1, torch.Generator().manual_seed(0))
    assert val.numel() == 4 and fit.numel() == 36
    feats = torch.eye(10)[tiny] * 5 + torch.randn(40, 10, generator=torch.Generator().manual_seed(1))
    res = linear_probe(feats, tiny, feats, tiny, num_classes=10, epochs=5)
    assert set(res.val_top1) == {0.01, 0.1, 1.0}


def test_extract_features_concatenates_in_order() -> None:
    images = torch.arange(10 * 3, dtype=torch.float64).reshape(10, 3)
    labels = torch.arange(10, dtype=torch.int32) % 4
    loader = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]  # batches of 4, 4, 2

    def encode(x: Tensor) -> dict[str, Tensor]:
        return {"knn": x[:, :2].half(), "linear": x.sum(dim=1, keepdim=True)}

    feats, ys = extract_features(encode, loader)
    assert set(feats) == {"knn", "linear"}
    for f in feats.values():
        assert f.dtype == torch.float32 and f.device.type == "cpu" and f.shape[0] == 10
    assert torch.equal(feats["knn"], images[:, :2].float())
    assert torch.equal(feats["linear"], images.sum(dim=1, keepdim=True).float())
    assert ys.dtype == torch.int64 and torch.equal(ys, labels.long())


def test_extract_features_rejects_empty_loader() -> None:
    with pytest.raises(SSLBenchError):
        extract_features(lambda x: {"knn": x}, [])


def test_monitor_extracts_a_teacher_equal_to_its_student_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from sslbench import create_backbone
    from sslbench.config import resolve_config
    from sslbench.data.datasets import load_dataset
    from sslbench.evaluation import monitor as monitor_module

    config = resolve_config([{"eval": {"monitor_bank_per_class": 2, "monitor_test_per_class": 1}}], ["byol"])
    torch.manual_seed(0)
    student = create_backbone("resnet18", 32)
    teacher = copy.deepcopy(student)
    passes: list[int] = []
    extract = monitor_module.extract_features
    monkeypatch.setattr(
        monitor_module, "extract_features", lambda *a, **k: passes.append(1) or extract(*a, **k)
    )
    watch = monitor_module.KnnMonitor(
        load_dataset("embedded"), config, torch.device("cpu"), {"student": student, "teacher": teacher}
    )
    same = watch()
    assert len(passes) == 2 and same["knn_student"] == same["knn_teacher"]  # bank and test, once
    with torch.no_grad():
        next(teacher.parameters()).add_(1.0)
    watch()
    assert len(passes) == 6  # now both
