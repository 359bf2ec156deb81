"""Losses are computed in at least fp32, whatever the autocast precision: a sharp softmax (DINO's
T = 0.04) or a similarity divided by a small temperature (SimCLR's 0.1) magnifies bf16 rounding."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 are promoted, fp64 kept): losses are computed outside autocast precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
