"""Online monitoring during training: a cheap k-NN of the student and the teacher every few epochs.

The DINO paper's Fig. 6 argument, that the teacher is better than the student throughout training, is
a curve, not a final number; this draws it for every method with an EMA copy.
"""

from __future__ import annotations

import torch

from sslbench.config import RunConfig
from sslbench.data.datasets import DatasetSplits
from sslbench.evaluation.features import eval_loaders, extract_features, feature_precision
from sslbench.evaluation.knn import knn_classify
from sslbench.models.backbones import Backbone


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
        self.precision = feature_precision(config, device)[0]

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        accuracies: dict[str, float] = {}
        for name, backbone in self.backbones.items():
            # A teacher before its first update equals its student: the same numbers, not recomputed.
            twin = next((seen for seen in accuracies if _same_weights(self.backbones[seen], backbone)), None)
            accuracies[name] = accuracies[twin] if twin is not None else self._knn(backbone)
        return {f"knn_{name}": accuracy for name, accuracy in accuracies.items()}

    def _knn(self, backbone: Backbone) -> float:
        backbone.eval()
        encode = backbone.forward_eval
        bank, bank_labels = extract_features(encode, self.loaders["bank"], self.device, self.precision)
        test, test_labels = extract_features(encode, self.loaders["test"], self.device, self.precision)
        accuracy = knn_classify(
            bank["knn"], bank_labels, test["knn"], test_labels, self.num_classes,
            ks=[self.k], temperature=self.temperature, device=self.device,
        )  # fmt: skip
        return round(accuracy[self.k], 2)


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Equal parameters and buffers, as a teacher has before its first EMA update."""
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
