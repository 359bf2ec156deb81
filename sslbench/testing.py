"""The contract every method keeps, importable by anyone who writes one: ``check_method(MyMethod)``.

The built-in methods are held to it by the test suite (tests/test_methods.py loops over the registry),
and a plugin's author can run the same checks in their own tests:

    from sslbench.testing import check_method
    check_method(MyMethod, options={"proj_dim": 32})

On each small backbone the method trains (a one-line refusal on the others), from images of the
embedded dataset, it checks that two optimisation steps through the runner's own step give finite
losses and gradients that reach the backbone; that declared teachers are frozen, outside the optimizer
and move by the EMA update and nothing else; and that the method's state (weights, buffers such as
queues, the optimizer and every random generator) survives a checkpoint round trip with a bit-identical
next step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sslbench.base.errors import SSLBenchError
from sslbench.data.augment import build_view_transform
from sslbench.data.datasets import DatasetSplits, load_dataset
from sslbench.method.base import Method, Step, TrainContext
from sslbench.method.registry import get_method
from sslbench.models.backbones import arch_spec, create_backbone
from sslbench.models.momentum import ema_update
from sslbench.training.checkpoint import restore_rng_state, rng_state
from sslbench.training.optim import build_optimizer, method_parameter_groups
from sslbench.training.step import optimization_step

SMALL_ARCHS = ("resnet18", "vit_tiny16")
EMA_MOMENTUM = 0.9  # far from 1, so a teacher visibly moves in one step
IMAGE_SIZE, BATCH, STEPS_PER_EPOCH = 32, 4, 2


def check_method(
    method: type[Method] | str,
    archs: Sequence[str] = SMALL_ARCHS,
    options: dict[str, Any] | None = None,
) -> list[str]:
    """Check ``method`` (a class or a registered name) on every arch of ``archs``; return the archs it
    trained on. ``options`` shrinks it for a CPU test (only the keys its ``Config`` has are used).
    Raises AssertionError naming the broken promise."""
    method_cls = get_method(method) if isinstance(method, str) else method
    data = _embedded()
    checked = []
    for arch in archs:
        if arch_spec(arch).family not in method_cls.families:
            _check_refusal(method_cls, arch, options)
            continue
        if method_cls.trainable:
            _check_training(method_cls, arch, options, data)
        checked.append(arch)
    return checked


@functools.cache
def _embedded() -> DatasetSplits:
    return load_dataset("embedded")


def small_config(method_cls: type[Method], options: dict[str, Any] | None) -> Any:
    """The method's Config with those of ``options`` it has."""
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    return method_cls.Config(**{k: v for k, v in (options or {}).items() if k in fields})


def build_small(method_cls: type[Method], arch: str, options: dict[str, Any] | None, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    context = TrainContext(2, STEPS_PER_EPOCH, 10, IMAGE_SIZE)
    return method_cls(create_backbone(arch, IMAGE_SIZE), small_config(method_cls, options), context)


def _check_refusal(method_cls: type[Method], arch: str, options: dict[str, Any] | None) -> None:
    try:
        build_small(method_cls, arch, options)
    except SSLBenchError as error:
        message = str(error)
        assert message and "\n" not in message, (
            f"{method_cls.name} on {arch}: refusal not one line: {message!r}"
        )
        return
    raise AssertionError(
        f"{method_cls.name} does not train {arch}'s family but was built on it without a word"
    )


def _views(method: Method, data: DatasetSplits, seed: int) -> tuple[list[Tensor], Tensor]:
    """The method's views of the first ``BATCH`` training images, drawn from a fixed seed."""
    transform = build_view_transform(method.view_recipe(), data.image_size, data.mean, data.std)
    with _seeded(seed):
        per_image = [transform(data.train.load(i)) for i in range(BATCH)]
    views = [torch.stack(group) for group in zip(*per_image, strict=True)]
    labels = torch.as_tensor([int(data.train.labels[i]) for i in range(BATCH)])
    return views, labels


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _optimizer(method: Method) -> torch.optim.Optimizer:
    optimizer = build_optimizer("adamw", method_parameter_groups(method), 0.9)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
        group["weight_decay"] = 0.04 if group.get("regularized") else 0.0
    return optimizer


def _step(method: Method, optimizer: torch.optim.Optimizer, data: DatasetSplits, iteration: int) -> Tensor:
    views, labels = _views(method, data, seed=100 + iteration)
    step = Step(iteration, iteration // STEPS_PER_EPOCH, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, diagnose=True)
    loss, _ = optimization_step(
        method, optimizer, views, labels, step, 3.0, EMA_MOMENTUM, contextlib.nullcontext()
    )
    return loss


def _check_training(
    method_cls: type[Method], arch: str, options: dict[str, Any] | None, data: DatasetSplits
) -> None:
    name = f"{method_cls.name} on {arch}"
    method = build_small(method_cls, arch, options).train()
    optimizer = _optimizer(method)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for online, ema in method.momentum_pairs():
        for param in ema.parameters():
            assert not param.requires_grad and id(param) not in optimized, (
                f"{name}: a teacher parameter trains"
            )
        assert [p.shape for p in online.parameters()] == [p.shape for p in ema.parameters()], (
            f"{name}: a momentum pair of different structure"
        )
    _check_first_step(method, optimizer, data, name)
    # The state after one step, as a checkpoint holds it; the second step from it must repeat exactly
    saved = copy.deepcopy({"method": method.state_dict(), "optimizer": optimizer.state_dict()})
    rng = rng_state()
    loss = _step(method, optimizer, data, 1)
    assert torch.isfinite(loss), f"{name}: second loss {loss.item()}"
    after = copy.deepcopy(method.state_dict())  # tensors, and extra state such as a MaskSeed's
    resumed = build_small(method_cls, arch, options, seed=1).train()  # other weights until loaded
    resumed.load_state_dict(saved["method"])
    resumed_optimizer = _optimizer(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    restore_rng_state(rng)
    resumed_loss = _step(resumed, resumed_optimizer, data, 1)
    assert torch.equal(resumed_loss, loss), f"{name}: a resumed step gives {resumed_loss} instead of {loss}"
    for key, value in resumed.state_dict().items():
        same = torch.equal(value, after[key]) if isinstance(value, Tensor) else value == after[key]
        assert same, f"{name}: '{key}' differs after a resumed step"


def _check_first_step(
    method: Method, optimizer: torch.optim.Optimizer, data: DatasetSplits, name: str
) -> None:
    """Step 0 by hand, as the runner's step does it, to look at the gradients before they are freed."""
    views, labels = _views(method, data, seed=100)
    step = Step(0, 0, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, diagnose=True)
    teachers_before = [[p.detach().clone() for p in ema.parameters()] for _, ema in method.momentum_pairs()]
    output = method.training_step(views, labels, step)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss), f"{name}: first loss {output.loss}"
    for key, value in output.logs.items():
        assert torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all(), (
            f"{name}: log '{key}' not finite"
        )
    output.loss.backward()
    backbone_grads = [p.grad for p in method.backbone.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in backbone_grads), f"{name}: no gradient reaches the backbone"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(method.momentum_pairs(), EMA_MOMENTUM)
    for (online, ema), before in zip(method.momentum_pairs(), teachers_before, strict=True):
        for old, new, student in zip(before, ema.parameters(), online.parameters(), strict=True):
            expected = EMA_MOMENTUM * old + (1 - EMA_MOMENTUM) * student.detach()
            torch.testing.assert_close(
                new, expected, rtol=0, atol=1e-6, msg=f"{name}: a teacher moved otherwise"
            )
