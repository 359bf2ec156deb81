"""Low-shot protocols: k-NN and the linear probe with only a few labelled images, on the cached features.

Self-supervised features are meant to need few labels, so the benchmark also evaluates them with a
labelled subset of the feature bank: a balanced, seeded share per class ("1%", "10%", as SimCLR's
semi-supervised subsets, Chen et al. 2020, Sec. 6), N images per class ("5/class"), or SimCLR's own
split files (``imagenet_subsets/1percent.txt`` in google-research/simclr, one image file name per line).
The subset only selects rows of features already extracted: nothing runs the backbone again. The test
split is the full one, so every setting is scored on the same images, each accuracy with its 95%
bootstrap interval (``sslbench.evaluation.confidence``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.evaluation.confidence import accuracy_record
from sslbench.evaluation.features import check_split
from sslbench.evaluation.knn import knn_predictions
from sslbench.evaluation.linear_probe import linear_probe

SPELLINGS = (
    "a share of the labelled bank per class such as '1%' or '10%' (0 < p <= 100), 'N/class' such as "
    "'5/class' (k-NN only), or 'file:PATH' (a SimCLR split file: one image file name per line)"
)
_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")
_PER_CLASS = re.compile(r"(\d+)/class")
_FILE_PREFIX = "file:"
_MISSING_SHOWN = 3  # names quoted when a split file lists images the bank lacks


@dataclass(frozen=True)
class LowShotSetting:
    """One labelled subset of the feature bank; exactly one of ``percent``, ``per_class``, ``split_file``."""

    name: str  # the spec as written: the key of its record
    percent: float | None = None
    per_class: int | None = None
    split_file: Path | None = None

    @property
    def protocols(self) -> tuple[str, ...]:
        """N/class is scored with the k-NN only: a few images per class leave nothing to hold out for the
        linear probe's lr sweep, and the k-NN needs no hyper-parameter chosen on labels."""
        return ("knn",) if self.per_class is not None else ("knn", "linear")

    def select(self, labels: np.ndarray, seed: int, names: Sequence[str] | None = None) -> np.ndarray:
        """Sorted indices into the bank. Shares and N/class draw a seeded random order within each class
        (``np.random.default_rng(seed)``, classes in ascending order) and keep its head, so for one seed
        a smaller setting is a subset of a larger one; a split file picks the images it names."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise SSLBenchError(f"low-shot setting '{self.name}' needs a non-empty labelled bank")
        if self.split_file is not None:
            return _select_listed(self.split_file, names, labels.size, self.name)
        rng = np.random.default_rng(seed)
        chosen = []
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            chosen.append(members[: self._images_of_class(int(cls), members.size)])
        return np.sort(np.concatenate(chosen)).astype(np.int64)

    def _images_of_class(self, cls: int, available: int) -> int:
        if self.percent is not None:
            return max(1, round(self.percent * available / 100.0))
        assert self.per_class is not None
        if self.per_class > available:
            raise SSLBenchError(
                f"low-shot setting '{self.name}' needs {self.per_class} labelled images of every class, but "
                f"class {cls} has {available} in the bank; lower N or enlarge the bank (eval.train_per_class)"
            )
        return self.per_class


def parse_low_shot(spec: str) -> LowShotSetting:
    """``"1%"`` / ``"10%"`` / ``"5/class"`` / ``"file:PATH"`` as a :class:`LowShotSetting`."""
    text = spec.strip()
    if text.startswith(_FILE_PREFIX) and text[len(_FILE_PREFIX) :].strip():
        path = Path(text[len(_FILE_PREFIX) :].strip()).expanduser()
        if not path.is_file():
            raise SSLBenchError(
                f"low-shot split file '{path}' (from '{spec}') not found; give a file with one image "
                "file name per line, e.g. SimCLR's imagenet_subsets/1percent.txt"
            )
        return LowShotSetting(name=spec, split_file=path)
    if match := _PERCENT.fullmatch(text):
        percent = float(match.group(1))
        if 0.0 < percent <= 100.0:
            return LowShotSetting(name=spec, percent=percent)
    elif (match := _PER_CLASS.fullmatch(text)) and int(match.group(1)) >= 1:
        return LowShotSetting(name=spec, per_class=int(match.group(1)))
    raise SSLBenchError(f"unknown low-shot setting '{spec}'; valid spellings: {SPELLINGS}")


def _base_name(name: str) -> str:
    """``train/n01440764/n01440764_10026.JPEG`` -> ``n01440764_10026.JPEG``, for either separator."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _select_listed(path: Path, names: Sequence[str] | None, bank_size: int, setting: str) -> np.ndarray:
    """Bank indices of the images a split file names, matched on file base name."""
    if names is None:
        raise SSLBenchError(
            f"low-shot setting '{setting}' picks images by file name, but this dataset has no file names "
            "(its images are decoded arrays); use a share such as '1%' or 'N/class' instead"
        )
    if len(names) != bank_size:
        raise SSLBenchError(f"low-shot setting '{setting}': {len(names)} bank names for {bank_size} labels")
    try:
        listed = [_base_name(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SSLBenchError(f"cannot read low-shot split file '{path}' ({exc}); check the path") from exc
    if not listed:
        raise SSLBenchError(f"low-shot split file '{path}' names no images; it needs one file name per line")
    position: dict[str, int] = {}
    repeated: set[str] = set()
    for index, name in enumerate(names):
        base = _base_name(str(name))
        if base in position:
            repeated.add(base)
        position[base] = index
    wanted = list(dict.fromkeys(listed))  # unique, in file order
    missing = [name for name in wanted if name not in position]
    if missing:
        raise SSLBenchError(
            f"{len(missing)} of the {len(wanted)} images in '{path}' are not in the labelled bank of "
            f"{bank_size} images (first: {', '.join(missing[:_MISSING_SHOWN])}); the file must name images "
            "of this dataset's training split, and the bank must hold all of it (no eval.train_per_class)"
        )
    ambiguous = [name for name in wanted if name in repeated]
    if ambiguous:
        raise SSLBenchError(
            f"{len(ambiguous)} names in '{path}' match more than one bank image (first: "
            f"{', '.join(ambiguous[:_MISSING_SHOWN])}); a split file needs file names unique in the bank"
        )
    return np.sort(np.array([position[name] for name in wanted], dtype=np.int64))


def _lr_choice(
    labels: np.ndarray, lrs: Sequence[float], val_fraction: float
) -> tuple[list[float], float, str]:
    """(lrs, val_fraction) to hand the linear probe for a small labelled subset, and how the lr is chosen.

    The held-out lr choice needs an image of a class on both sides of the split, i.e. two or more. When
    ``val_fraction`` of the smallest such class rounds to none, the share is raised to one image of that
    class (1 / its size: half of a 2-per-class subset). When every class has one image there is nothing to
    hold out, and the rule is the sweep's middle lr (its median; the larger of the two middle ones).
    """
    sweep = sorted({float(lr) for lr in lrs})
    if len(sweep) <= 1:
        return sweep, 0.0, "the only lr in the sweep"
    counts = np.unique(labels, return_counts=True)[1]
    smallest = int(counts[counts >= 2].min()) if (counts >= 2).any() else 0
    if smallest == 0:
        middle = sweep[len(sweep) // 2]
        return [middle], 0.0, "none held out (one image per class): the sweep's middle lr, by rule"
    if round(val_fraction * smallest) >= 1:
        return sweep, val_fraction, f"held-out {val_fraction:.0%} of the subset"
    raised = 1.0 / smallest
    how = f"held-out {raised:.0%} of the subset (one image of its smallest class; {val_fraction:.0%}: none)"
    return sweep, raised, how


def _accuracy_records(predictions: dict[int, Tensor], labels: Tensor, resamples: int, seed: int) -> dict:
    records = {str(k): accuracy_record(pred, labels, resamples, seed) for k, pred in predictions.items()}
    return {
        "knn": {k: record["top1"] for k, record in records.items()},
        "knn_ci95": {k: record["ci95"] for k, record in records.items()},
    }


def _linear_record(
    bank_x: Tensor,
    bank_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    probe: dict[str, Any],
    device: torch.device | str,
    resamples: int,
) -> dict[str, Any]:
    """The linear probe on one labelled subset, its lr chosen as :func:`_lr_choice` says."""
    lrs, held_out, how = _lr_choice(bank_y.numpy(), probe["lrs"], probe["val_fraction"])
    result = linear_probe(
        bank_x, bank_y, test_x, test_y, num_classes,
        lrs=lrs, epochs=probe["epochs"], val_fraction=held_out, seed=probe["seed"], device=device,
    )  # fmt: skip
    record = accuracy_record(result.test_predictions, test_y, resamples, probe["seed"])
    return {**record, "best_lr": result.best_lr, "lr_chosen_on": how}


def low_shot_evaluation(
    settings: Sequence[LowShotSetting | str],
    bank_features: dict[str, Tensor],
    bank_labels: Tensor | np.ndarray,
    test_features: dict[str, Tensor],
    test_labels: Tensor,
    num_classes: int,
    *,
    ks: Sequence[int],
    headline_k: int,
    temperature: float,
    linear_lrs: Sequence[float],
    linear_epochs: int,
    val_fraction: float,
    seed: int,
    device: torch.device | str,
    bank_names: Sequence[str] | None = None,
    resamples: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Per setting name: ``{"bank_images", "knn": {k: top1}, "knn_ci95": {k: [lo, hi]}, "linear"}``.

    Feature dicts are ``Backbone.forward_eval``'s (``"knn"`` and ``"linear"``); without a ``"linear"``
    key, or for an N/class setting, ``"linear"`` is None, else ``{"top1", "ci95", "best_lr",
    "lr_chosen_on"}``. ``headline_k`` must be one of ``ks`` (the k a table reads). Subsets and probes are
    seeded with ``seed``; intervals are 95% percentile bootstraps with ``resamples`` draws.
    """
    if headline_k not in ks:
        raise SSLBenchError(f"low-shot headline k {headline_k} must be one of the k-NN ks {list(ks)}")
    for split, features in (("bank", bank_features), ("test", test_features)):
        if "knn" not in features:
            raise SSLBenchError(
                f"low-shot evaluation needs 'knn' features for the {split}; got {sorted(features)}"
            )
    bank_y = (
        bank_labels.cpu().long() if isinstance(bank_labels, Tensor) else torch.as_tensor(bank_labels).long()
    )
    test_y = torch.as_tensor(test_labels).cpu().long()
    check_split(test_features["knn"], test_y, num_classes, "test")
    with_linear = "linear" in bank_features and "linear" in test_features
    records: dict[str, dict[str, Any]] = {}
    for setting in settings:
        setting = parse_low_shot(setting) if isinstance(setting, str) else setting
        if setting.name in records:
            raise SSLBenchError(f"low-shot setting '{setting.name}' is listed twice; list each once")
        chosen = torch.from_numpy(setting.select(bank_y.numpy(), seed, bank_names))
        subset_y = bank_y[chosen]
        predictions = knn_predictions(
            bank_features["knn"][chosen],
            subset_y,
            test_features["knn"],
            num_classes,
            ks,
            temperature,
            device=device,
        )
        record: dict[str, Any] = {
            "bank_images": int(chosen.numel()),
            **_accuracy_records(predictions, test_y, resamples, seed),
        }
        record["linear"] = None
        if with_linear and "linear" in setting.protocols:
            probe = {"lrs": linear_lrs, "epochs": linear_epochs, "val_fraction": val_fraction, "seed": seed}
            record["linear"] = _linear_record(
                bank_features["linear"][chosen], subset_y, test_features["linear"], test_y, num_classes,
                probe, device, resamples,
            )  # fmt: skip
        records[setting.name] = record
    return records
