"""Training every method alike: the run of all pairs (``experiment``), one pair (``runner``), the loop
(``loop``) and its step (``step``) and state (``state``), optimizers, checkpoints, stopping on a signal
(``interrupt``), distributed training, run folders and ablations."""

from __future__ import annotations

import importlib
import warnings

# Names the flat layout's sslbench/training.py held, and the module that holds each now.
_MOVED_NAMES = {
    "train_loop": "loop",
    "Checkpointing": "checkpoint",
    "LossGuard": "step",
    "clip_per_parameter": "step",
    "memory_format_for": "step",
    "optimization_step": "step",
    "precision_for": "step",
}


def __getattr__(name: str) -> object:
    if name not in _MOVED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = f"{__name__}.{_MOVED_NAMES[name]}"
    warnings.warn(f"{__name__}.{name} moved to {home}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), name)
