"""Published training recipes, as ``--recipe paper`` applies them to a pair.

A recipe is everything a reference command sets about the optimisation (optimizer, lr, its schedule's
ends and warm-up, weight decay, momentum, clipping and, for methods with one, the EMA), plus the method
options the command names; the run keeps its scale (epochs, batch size, number of crops, image size).
Every recipe sets all of ``RECIPE_TRAIN_KEYS``, so a recipe replaces the same keys whatever the preset or
the flags set, and a pair's protocol can say exactly where its schedule came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RECIPE_TRAIN_KEYS = (
    "optimizer",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "weight_decay_end",
    "momentum",
    "clip_grad",
)


@dataclass(frozen=True)
class PaperRecipe:
    """A reference recipe: ``train`` keys (all of ``RECIPE_TRAIN_KEYS``, and ``ema_momentum`` /
    ``ema_momentum_end`` where the method has an EMA), the method ``options`` it sets, and ``label``,
    what the protocol records (e.g. ``"resnet, 300-epoch values"``) beside ``source``, the command or
    section it transcribes."""

    label: str
    source: str
    train: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [key for key in RECIPE_TRAIN_KEYS if key not in self.train]
        if missing:
            raise ValueError(f"paper recipe '{self.label}' does not set {', '.join(missing)}")


def nearest_epochs(epochs: int, published: Mapping[int, Any]) -> int:
    """The published schedule length closest to ``epochs`` on a log scale (a 2-epoch run takes the
    shortest one's values, a 200-epoch run the 300-epoch ones)."""
    return min(published, key=lambda length: (abs(math.log(length / max(epochs, 1))), length))
