"""Evaluation of a frozen network: weighted k-NN, a linear protocol, low-shot protocols, and a 95%
interval beside every accuracy.

Features are extracted once per set of weights and shared by the k-NN, the fast linear probe and the
low-shot protocols (``sslbench.evaluation.features``), so none of them runs the backbone again; only the
DINO paper's linear protocol (``eval.linear=paper``) does, since it trains on augmented images. The same
function evaluates a network trained here and one loaded from another project's checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslbench.config import RunConfig
from sslbench.config.run_config import linear_kind
from sslbench.data.datasets import DatasetSplits, ImageSource, SubsetSource, subset_indices
from sslbench.evaluation.confidence import accuracy_record, bootstrap_interval
from sslbench.evaluation.features import cached_features, eval_loaders, feature_precision
from sslbench.evaluation.knn import knn_predictions
from sslbench.evaluation.linear_paper import paper_linear_evaluation
from sslbench.evaluation.linear_probe import linear_probe
from sslbench.evaluation.low_shot import low_shot_evaluation, parse_low_shot
from sslbench.method.base import Method
from sslbench.models.backbones import Backbone


def evaluate_method(
    method: Method,
    config: RunConfig,
    data: DatasetSplits,
    device: torch.device,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The network a method is evaluated on (its teacher, for DINO), in evaluation mode."""
    method.eval()
    return evaluate_backbone(method.eval_backbone(), config, data, device, cache_dir)


def evaluate_backbone(
    backbone: Backbone,
    config: RunConfig,
    data: DatasetSplits,
    device: torch.device,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Frozen features once (no augmentation; cached in ``cache_dir`` per set of weights), then every
    protocol the config asks for. Returns the numbers and how they were made, for eval.json."""
    eval_cfg = config.eval
    backbone.eval()
    per_class = {"bank": eval_cfg.train_per_class, "test": eval_cfg.test_per_class}
    loaders = eval_loaders(data, config, device, per_class, config.train.num_workers)
    protocol = {"dataset": data.name, "size": data.image_size, "per_class": per_class, "seed": config.seed}
    precision = feature_precision(config, device)[0]
    features = cached_features(backbone, loaders, device, cache_dir, protocol, precision)
    (bank_feats, bank_labels), (test_feats, test_labels) = features["bank"], features["test"]
    resamples, seed = eval_cfg.bootstrap_resamples, config.seed
    predictions = knn_predictions(
        bank_feats["knn"],
        bank_labels,
        test_feats["knn"],
        data.num_classes,
        ks=eval_cfg.knn_k,
        temperature=eval_cfg.knn_temperature,
        device=device,
    )
    knn = {str(k): _accuracy(pred, test_labels, resamples, seed) for k, pred in predictions.items()}
    linear, linear_protocol = _linear(backbone, config, data, device, features, precision)
    low_shot = None
    if eval_cfg.low_shot:
        low_shot = low_shot_evaluation(
            [parse_low_shot(spec) for spec in eval_cfg.low_shot],
            bank_feats,
            bank_labels,
            test_feats,
            test_labels,
            data.num_classes,
            ks=eval_cfg.knn_k,
            headline_k=eval_cfg.knn_headline_k,
            temperature=eval_cfg.knn_temperature,
            linear_lrs=eval_cfg.linear_lrs,
            linear_epochs=eval_cfg.linear_epochs,
            val_fraction=eval_cfg.linear_val_fraction,
            seed=seed,
            device=device,
            bank_names=_file_names(_bank_source(data, config)),
            resamples=max(resamples, 1),
        )
    return {
        "knn": {k: record["top1"] for k, record in knn.items()},
        "knn_ci95": {k: record["ci95"] for k, record in knn.items() if "ci95" in record},
        "linear": linear,
        "low_shot": low_shot,
        "bank_images": len(loaders["bank"].dataset),
        "test_images": len(loaders["test"].dataset),
        "linear_kind": linear_kind(eval_cfg.linear),
        "linear_protocol": linear_protocol,
    }


def _accuracy(predictions: Tensor, labels: Tensor, resamples: int, seed: int) -> dict[str, Any]:
    """Top-1 % and, unless intervals are off, its 95% bootstrap interval over the test images."""
    if resamples > 0:
        return accuracy_record(predictions, labels, resamples=resamples, seed=seed)
    return {"top1": round(100.0 * (predictions == labels).float().mean().item(), 2)}


def _linear(
    backbone: Backbone,
    config: RunConfig,
    data: DatasetSplits,
    device: torch.device,
    features: dict[str, tuple[dict[str, Tensor], Tensor]],
    precision: str,
) -> tuple[dict[str, Any] | None, str | None]:
    """The linear protocol ``eval.linear`` names, with the line that describes it in the protocol."""
    eval_cfg, kind = config.eval, linear_kind(config.eval.linear)
    (bank_feats, bank_labels), (test_feats, test_labels) = features["bank"], features["test"]
    if kind is None:
        return None, None
    if kind == "paper":
        result = paper_linear_evaluation(
            backbone,
            _bank_source(data, config),
            _test_source(data, config),
            data.num_classes,
            image_size=data.image_size,
            mean=data.mean,
            std=data.std,
            epochs=eval_cfg.linear_paper_epochs,
            batch_size=eval_cfg.linear_paper_batch_size,
            val_fraction=eval_cfg.linear_val_fraction,
            seed=config.seed,
            device=device,
            precision=precision,
            num_workers=config.train.num_workers,
            **({"lrs": eval_cfg.linear_paper_lrs} if eval_cfg.linear_paper_lrs else {}),
        )
        description = result.description
    else:
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
        description = (
            f"SGD on standardised frozen features, {eval_cfg.linear_epochs} epochs, lr sweep "
            f"{eval_cfg.linear_lrs} chosen on {eval_cfg.linear_val_fraction:.0%} held out"
        )
    record: dict[str, Any] = {
        "top1": round(result.top1, 2),
        "best_lr": result.best_lr,
        "val_top1": {str(k): round(v, 2) for k, v in result.val_top1.items()},
    }
    if eval_cfg.bootstrap_resamples > 0 and result.test_predictions is not None:
        correct = (result.test_predictions.cpu() == test_labels.cpu()).numpy()
        low, high = bootstrap_interval(correct, resamples=eval_cfg.bootstrap_resamples, seed=config.seed)
        record["ci95"] = [round(low, 2), round(high, 2)]
    return record, description


def _bank_source(data: DatasetSplits, config: RunConfig) -> ImageSource:
    """The labelled images the k-NN bank and the linear protocols learn from (as ``eval_loaders``)."""
    indices = subset_indices(data.train.labels, config.eval.train_per_class, config.seed)
    return SubsetSource(data.train, indices)


def _test_source(data: DatasetSplits, config: RunConfig) -> ImageSource:
    return SubsetSource(data.test, subset_indices(data.test.labels, config.eval.test_per_class, config.seed))


def _file_names(source: ImageSource) -> list[str] | None:
    """The bank's image file names (for SimCLR's low-shot split files); None for decoded arrays."""
    if isinstance(source, SubsetSource) and hasattr(source.source, "paths"):
        return [source.source.paths[int(i)].name for i in source.indices]
    return None
