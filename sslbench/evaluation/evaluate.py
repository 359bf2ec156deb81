"""Evaluation of a trained method on frozen features: weighted k-NN and a linear probe.

Features are extracted once per trained model and shared by both evaluators
(``sslbench.evaluation.features``), so neither ever runs the backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sslbench.config import RunConfig
from sslbench.data.datasets import DatasetSplits
from sslbench.evaluation.features import cached_features, eval_loaders, feature_precision
from sslbench.evaluation.knn import knn_classify
from sslbench.evaluation.linear_probe import linear_probe
from sslbench.method.base import Method


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
    precision = feature_precision(config, device)[0]
    features = cached_features(backbone, loaders, device, cache_dir, protocol, precision)
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
