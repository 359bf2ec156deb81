"""One optimization step, the same for every method, and what each iteration hands it.

Shared here, so every method gets it identically: per-iteration lr / weight-decay / EMA-momentum
schedules, precision, per-parameter clipping, EMA updates of declared teachers, and the non-finite-loss
guard. Nothing here waits for the device: the loss stays a device tensor, read by ``LossGuard`` only
when the loop logs, so a GPU can run ahead of the Python loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sslbench.base.collectives import all_reduce_mean
from sslbench.base.errors import SSLBenchError
from sslbench.base.precision import precision_choice
from sslbench.base.schedules import cosine_schedule
from sslbench.config import TrainConfig
from sslbench.method import Method, Step, StepOutput
from sslbench.models.momentum import ema_update


def precision_for(train: TrainConfig, device: torch.device) -> str:
    """The autocast precision a run trains in: ``train.precision``, with ``auto`` resolved for ``device``
    (``sslbench.base.precision``)."""
    return precision_choice(train.precision, device)[0]


def memory_format_for(device: torch.device, family: str) -> torch.memory_format:
    """Channels-last convolutions are faster on CUDA tensor cores; the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" and family == "resnet" else torch.contiguous_format


def fused_attention_for(device: torch.device, precision: str) -> bool:
    """Fused attention (flash on CUDA) except on a CPU under bf16, where PyTorch's fused kernel made a
    ViT's forward and backward 1.15-1.45x slower than matmul-softmax-matmul (17-197 tokens; at parity
    in fp32; benchmarks/RESULTS.md)."""
    return not (device.type == "cpu" and precision == "bf16")


def device_views(device: torch.device, memory_format: torch.memory_format) -> Callable[[Any], list[Tensor]]:
    """The CPU augmentation path's ``make_views``: the loader's views, moved to the device."""

    def move(views: Any) -> list[Tensor]:
        return [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]

    return move


@dataclass(frozen=True)
class Schedules:
    """The run's per-iteration values, computed once as arrays (the DINO reference's habit)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    ema_momentum: np.ndarray

    @classmethod
    def for_run(cls, train: TrainConfig, iterations_per_epoch: int) -> Schedules:
        epochs, ipe = train.epochs, iterations_per_epoch
        scale = train.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as every reference does
        return cls(
            lr=cosine_schedule(train.lr * scale, train.min_lr, epochs, ipe, train.warmup_epochs),
            weight_decay=cosine_schedule(train.weight_decay, train.weight_decay_end, epochs, ipe),
            ema_momentum=cosine_schedule(train.ema_momentum, train.ema_momentum_end, epochs, ipe),
        )

    @property
    def total(self) -> int:
        return len(self.lr)

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Set this iteration's lr, and weight decay on the regularised group (none on biases and norms)."""
        for group in optimizer.param_groups:
            group["lr"] = float(self.lr[iteration])
            if group["regularized"]:
                group["weight_decay"] = float(self.weight_decay[iteration])

    def at(self, iteration: int) -> dict[str, float]:
        """This iteration's values, as a train record holds them."""
        return {
            "lr": float(self.lr[iteration]),
            "weight_decay": float(self.weight_decay[iteration]),
            "ema_momentum": float(self.ema_momentum[iteration]),
        }


def clip_per_parameter(params: Sequence[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient is clipped to ``max_norm`` on its own.

    One multi-tensor norm and one multi-tensor scale for all parameters, with the factors kept on the
    device (no host synchronisation).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(factors.unbind()))


def drop_frozen_gradients(method: Method, step: Step) -> None:
    """The method's ``ParameterRule``s with ``frozen_epochs``: no gradient, so no update, while frozen.
    Applied after clipping, as DINO's ``cancel_gradients_last_layer``."""
    for rule in method.parameter_rules():
        if rule.frozen_at(step):
            for param in rule.module.parameters():
                param.grad = None


def optimization_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: list[Tensor],
    labels: Tensor,
    step: Step,
    clip_grad: float,
    ema_momentum: float,
    autocast: contextlib.AbstractContextManager,
    model: nn.Module | None = None,
) -> tuple[Tensor, StepOutput]:
    """Forward, loss, backward, clipping, the method's parameter rules and hook, optimizer step, EMA: the
    same for every method.

    ``model`` is what runs the forward: the method itself, or its DistributedDataParallel wrapper.
    Returns the detached loss (a device tensor: reading it is left to the caller) and the output.
    """
    with autocast:
        output = (model or method)(views, labels, step)
    output.loss.backward()
    if clip_grad > 0:
        clip_per_parameter([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    drop_frozen_gradients(method, step)
    method.after_backward(step)
    optimizer.step()
    # Gradients are freed here, not before the next backward: the next forward's activations then
    # never share memory with a full set of stale gradients (the peak is one or the other).
    optimizer.zero_grad(set_to_none=True)
    ema_update(method.momentum_pairs(), ema_momentum)
    return output.loss.detach(), output


class LossGuard:
    """Holds the losses of the iterations since the last read; reading them is one synchronisation.

    A non-finite loss stops the pair with the iteration where it first appeared, the last finite loss
    and advice. In a distributed run the losses are averaged over ranks first, so every rank stops at
    the same check.
    """

    def __init__(self, last_finite: float = math.nan) -> None:
        self.pending: list[tuple[Step, Tensor]] = []
        self.last_finite = last_finite

    def add(self, step: Step, loss: Tensor) -> None:
        self.pending.append((step, loss))

    def check(self) -> float:
        """The latest loss, after checking every pending one."""
        if not self.pending:
            return self.last_finite
        values = all_reduce_mean(torch.stack([loss.float() for _, loss in self.pending])).tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise SSLBenchError(
                    f"loss became {value} at iteration {step.iteration} (epoch {step.epoch}); last finite "
                    f"loss {self.last_finite:.4g}. Try a lower lr (--set train.lr=...), fp32 "
                    "(--set train.precision=fp32), or for DINO a higher teacher temperature."
                )
            self.last_finite = value
        return self.last_finite
