"""Optimizers the runner builds for every method alike: AdamW, SGD and LARS.

Parameter groups follow the references: biases and normalisation weights (every parameter with
fewer than two dimensions) get no weight decay, and LARS does not adapt them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "lars")


def parameter_groups(modules: Iterable[nn.Module]) -> list[dict]:
    """Split trainable parameters into a regularised group and one without weight decay."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "regularized": True},
        {"params": no_decay, "regularized": False, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv 1708.03888), as BYOL and SimCLR use it.

    For each parameter ``w`` with gradient ``g``: ``g <- g + wd * w``; unless excluded,
    ``g <- g * eta * ||w|| / ||g||`` (when both norms are positive); then SGD with momentum.
    """

    def __init__(
        self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ):
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "lars_exclude": False},
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.add(param, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["eta"] * param_norm / update_norm, 1.0
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict], momentum: float) -> torch.optim.Optimizer:
    """Learning rate and weight decay are set by the runner each iteration from the schedules."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=0.0, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
