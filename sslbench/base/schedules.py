"""Per-iteration schedules, computed once as arrays (the DINO reference's habit).

An array indexed by the global iteration makes every schedule exact, inspectable and identical
across methods, and resuming is just an index.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iterations_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value``, then a half cosine to ``final_value``.

    As the DINO reference's ``cosine_scheduler``: the warm-up is ``np.linspace`` with its end point, so
    it reaches ``base_value`` on its last iteration (BYOL's and SimCLR's ``step / W`` reach it one
    iteration later, a factor (W - 1) / W on the warm-up).
    """
    total = epochs * iterations_per_epoch
    # A warm-up longer than training follows its full ramp and is cut where training ends
    warmup = np.linspace(start_warmup_value, base_value, int(round(warmup_epochs * iterations_per_epoch)))[
        :total
    ]
    warmup_iters = len(warmup)
    steps = np.arange(total - warmup_iters)
    span = max(len(steps), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / span))
    schedule = np.concatenate([warmup, cosine])
    assert len(schedule) == total
    return schedule


def linear_warmup_then_constant(
    start_value: float, final_value: float, warmup_epochs: float, epochs: int, iterations_per_epoch: int
) -> np.ndarray:
    """DINO's teacher temperature: linear from ``start_value`` to ``final_value``, then constant. The DINO
    reference steps it per epoch: ``iterations_per_epoch=1``, indexed by the epoch."""
    total = epochs * iterations_per_epoch
    warmup = np.linspace(start_value, final_value, int(round(warmup_epochs * iterations_per_epoch)))[:total]
    return np.concatenate([warmup, np.full(total - len(warmup), final_value)])
