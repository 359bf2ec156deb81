"""Online monitoring during training: a cheap k-NN of the student and the teacher every few epochs.

The DINO paper's Fig. 6 argument, that the teacher is better than the student throughout training, is
a curve, not a final number; this draws it for every method with an EMA copy.
"""

from __future__ import annotations

import torch

from sslbench.config import RunConfig
from sslbench.data.datasets import DatasetSplits
from sslbench.evaluation.features import eval_loaders, extract_features
from sslbench.evaluation.knn import knn_classify


class KnnMonitor:
    """A cheap k-NN on a fixed balanced subset, to watch student and teacher learn during training.

    The subsets and their loaders are built once; each call extracts features of every watched backbone
    in eval mode and returns ``{"knn_student": ..., "knn_teacher": ...}`` (top-1 %, the headline k).
    """

    def __init__(self, data: DatasetSplits, config: RunConfig, device: torch.device, backbones: dict) -> None:
        eval_cfg = config.eval
        per_class = {"bank": eval_cfg.monitor_bank_per_class, "test": eval_cfg.monitor_test_per_class}
        self.loaders = eval_loaders(data, config, device, per_class, workers=0)
        self.backbones, self.device, self.num_classes = backbones, device, data.num_classes
        self.k = eval_cfg.knn_headline_k
        self.temperature = eval_cfg.knn_temperature

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        results = {}
        for name, backbone in self.backbones.items():
            backbone.eval()
            bank, bank_labels = extract_features(backbone.forward_eval, self.loaders["bank"], self.device)
            test, test_labels = extract_features(backbone.forward_eval, self.loaders["test"], self.device)
            accuracy = knn_classify(
                bank["knn"], bank_labels, test["knn"], test_labels, self.num_classes,
                ks=[self.k], temperature=self.temperature, device=self.device,
            )  # fmt: skip
            results[f"knn_{name}"] = round(accuracy[self.k], 2)
        return results
