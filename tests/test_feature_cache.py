"""Frozen features are cached on disk per set of weights and shared by both evaluators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sslbench.evaluation.features as features
from sslbench import TrainContext, create_backbone, get_method
from sslbench.config import RunConfig, resolve_config
from sslbench.data.datasets import ArraySource, DatasetSplits
from sslbench.evaluation.evaluate import evaluate_method
from sslbench.evaluation.features import weights_digest

CPU = torch.device("cpu")


@pytest.fixture
def small() -> tuple[DatasetSplits, RunConfig]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(40) % 4)
    data = DatasetSplits("synthetic", source, source, list("abcd"), 32, (0.5,) * 3, (0.25,) * 3, "test")
    config = resolve_config([{"eval": {"knn_k": [5], "knn_headline_k": 5, "linear_epochs": 5}}], ["random"])
    return data, config


def _method():
    torch.manual_seed(0)
    return get_method("random")(create_backbone("resnet18", 32), None, TrainContext(1, 1, 4, 32))


def test_features_are_extracted_once_and_read_back(small, tmp_path, monkeypatch):
    data, config = small
    method = _method()
    first = evaluate_method(method, config, data, CPU, tmp_path)
    files = list(tmp_path.glob("features-*.pt"))
    assert len(files) == 1
    stored = torch.load(files[0], weights_only=True)
    assert set(stored) == {"bank", "test"} and stored["bank"]["features"]["knn"].shape == (40, 512)

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    assert evaluate_method(method, config, data, CPU, tmp_path) == first


def test_new_weights_never_read_stale_features(small, tmp_path):
    data, config = small
    method = _method()
    evaluate_method(method, config, data, CPU, tmp_path)
    before = weights_digest(method.eval_backbone())
    with torch.no_grad():
        next(method.backbone.parameters()).add_(1.0)
    assert weights_digest(method.eval_backbone()) != before
    evaluate_method(method, config, data, CPU, tmp_path)
    assert len(list(tmp_path.glob("features-*.pt"))) == 2


def test_without_a_cache_folder_nothing_is_written(small, tmp_path, monkeypatch):
    data, config = small
    monkeypatch.chdir(tmp_path)
    evaluate_method(_method(), config, data, CPU, None)
    assert not list(tmp_path.rglob("*.pt"))
