"""The exponential moving average that builds every teacher / target network.

A method declares ``(online, ema)`` module pairs; the runner calls ``ema_update`` with the
per-iteration momentum from the shared schedule. One implementation for DINO, BYOL and any plugin.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy that starts equal to ``module`` (DINO's teacher starts so; BYOL copies a second draw).

    The copy has no stochastic depth: the DINO reference builds its teacher without drop-path.
    """
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.requires_grad_(False)
    for sub in clone.modules():
        if hasattr(sub, "drop_prob"):  # timm's DropPath
            sub.drop_prob = 0.0
    return clone


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``ema <- m * ema + (1 - m) * online`` for every parameter (DINO Eq. 2 / BYOL Eq. 1).

    Buffers (BatchNorm statistics) are not averaged: each network keeps the statistics of its own
    forward passes, as in the reference implementations.
    """
    for online, ema in pairs:
        online_params = [p.detach() for p in online.parameters()]
        ema_params = list(ema.parameters())
        if len(online_params) != len(ema_params):
            raise ValueError("an EMA pair has modules of different structure")
        torch._foreach_mul_(ema_params, momentum)
        torch._foreach_add_(ema_params, online_params, alpha=1.0 - momentum)
