"""The two implementations of one training step that ``bench_vs_lightly`` compares: sslbench's own
(the registry's method through ``optimization_step``) and lightly's, as its examples write it, on the
same seeded backbone, views and hyper-parameters. Each side autocasts in the precision it is given
(``fp32`` or ``bf16``), so the benchmark can hold precision equal or give each library its default. See
``bench_vs_lightly``'s docstring for what still differs between them and why.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sslbench import Step, TrainContext, create_backbone, get_method
from sslbench.base.precision import autocast_for
from sslbench.config import TrainConfig
from sslbench.data.augment import crop_sizes
from sslbench.method import Method
from sslbench.models.backbones import arch_spec, set_fused_attention
from sslbench.training.optim import build_optimizer, parameter_groups
from sslbench.training.step import fused_attention_for, memory_format_for, optimization_step

METHODS = ("dino", "byol", "simclr")
IMPLS = ("sslbench", "lightly")
IPE = 100  # iterations per epoch of the pretend schedule; the step is iteration IPE, epoch 1
EPOCH = 1


@dataclass
class Setup:
    name: str
    arch: str
    device: torch.device
    image_size: int
    batch: int
    local_crops: int

    @property
    def family(self) -> str:
        return arch_spec(self.arch).family

    @property
    def layout(self) -> torch.memory_format:
        return memory_format_for(self.device, self.family)


@dataclass
class Side:
    step: Callable[[], Tensor | float]
    params: int  # trainable parameters


def make_views(setup: Setup) -> list[Tensor]:
    """DINO: 2 global + ``local_crops`` local crops at sslbench's sizes; BYOL / SimCLR: 2 views."""
    generator = torch.Generator().manual_seed(1)
    global_size, local_size = crop_sizes(setup.image_size)
    sizes = [global_size] * 2 + ([local_size] * setup.local_crops if setup.name == "dino" else [])
    views = [torch.randn(setup.batch, 3, s, s, generator=generator) for s in sizes]
    return [v.to(setup.device, memory_format=setup.layout) for v in views]


def _config(setup: Setup) -> Any:
    config = get_method(setup.name).Config()
    if setup.name == "dino":
        config.local_crops_number = setup.local_crops
    return config


def method_config(setup: Setup) -> Any:
    """The method's config as its constructor resolves it (built on the meta device: no memory)."""
    config = _config(setup)
    with torch.device("meta"):
        get_method(setup.name)(create_backbone(setup.arch, setup.image_size), config, _context(setup))
    return config


def _context(setup: Setup) -> TrainContext:
    return TrainContext(10, IPE, 10, setup.image_size)


def seeded_backbone(setup: Setup) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(setup.arch, setup.image_size)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def sslbench_side(
    setup: Setup, backbone: nn.Module, views: list[Tensor], precision: str
) -> tuple[Side, Method]:
    """The runner's step; ``precision`` is a resolved one (``fp32`` or ``bf16``), as the runner passes,
    with the runner's attention kernel for it and its fused optimizer."""
    train = TrainConfig()
    method = get_method(setup.name)(backbone, _config(setup), _context(setup))
    method = method.to(setup.device, memory_format=setup.layout)
    set_fused_attention(method, fused_attention_for(setup.device, precision))
    optimizer = build_optimizer("adamw", parameter_groups([method]), train.momentum, setup.device)
    for group in optimizer.param_groups:  # what the runner's schedules set at the start
        group["lr"] = train.lr * setup.batch / 256
        if group["regularized"]:
            group["weight_decay"] = train.weight_decay
    labels = torch.zeros(setup.batch, dtype=torch.long, device=setup.device)
    step = Step(IPE * EPOCH, EPOCH, IPE, IPE * 10)
    autocast = autocast_for(precision, setup.device)

    def run() -> Tensor | float:
        loss, _ = optimization_step(method, optimizer, views, labels, step, 0.0, train.ema_momentum, autocast)
        return loss

    return Side(run, _trainable(method)), method


def _copy_stack(source: nn.Sequential, target: nn.Sequential) -> None:
    """Layer by layer; a bias lightly leaves out in front of a BatchNorm is simply not copied."""
    for src, dst in zip(source, target, strict=True):
        if type(src) is not type(dst):
            raise ValueError(f"{type(src).__name__} vs {type(dst).__name__}")
        state = src.state_dict()
        dst.load_state_dict({key: state[key] for key in dst.state_dict()})


def lightly_side(
    setup: Setup, backbone: nn.Module, views: list[Tensor], config: Any, source: Method | None, precision: str
) -> tuple[Side, bool]:
    """lightly's example step; also returns whether the heads took ``source``'s (sslbench's) weights.

    ``precision`` ``fp32`` runs it without autocast, as its examples do by default (Lightning's 32-bit).
    """
    from lightly import loss
    from lightly.models import modules
    from lightly.models.utils import deactivate_requires_grad as freeze
    from lightly.models.utils import update_momentum

    feat, m, copied = backbone.feat_dim, TrainConfig().ema_momentum, source is not None

    def copy_from(fn: Callable[[], object]) -> None:
        nonlocal copied
        try:
            if source is not None:
                fn()
        except (AttributeError, KeyError, RuntimeError, ValueError):
            copied = False  # the structures drifted apart: own init, first losses not comparable

    hooks: list[Callable[[], object]] = []  # between backward and the optimizer step
    if setup.name == "dino":
        dims = (feat, config.hidden_dim, config.bottleneck_dim, config.out_dim)
        with warnings.catch_warnings():  # lightly's head uses the deprecated hook-based weight_norm
            warnings.simplefilter("ignore")
            norm = config.norm_last_layer
            head = modules.DINOProjectionHead(
                *dims, freeze_last_layer=config.freeze_last_layer_epochs, norm_last_layer=norm
            )
            teacher_head = modules.DINOProjectionHead(*dims, norm_last_layer=norm)

        def copy_dino() -> None:
            _copy_stack(source.head.mlp, head.layers)
            weight = source.head.last_layer.parametrizations.weight
            head.last_layer.weight_g.data.copy_(weight.original0.data)
            head.last_layer.weight_v.data.copy_(weight.original1.data)

        copy_from(copy_dino)
        teacher_head.load_state_dict(head.state_dict())
        teacher = copy.deepcopy(backbone)
        freeze(teacher)
        freeze(teacher_head)
        model = nn.ModuleList([backbone, head, teacher, teacher_head])
        criterion = loss.DINOLoss(
            output_dim=config.out_dim,
            warmup_teacher_temp=config.warmup_teacher_temp,
            teacher_temp=config.teacher_temp,
            warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
        ).to(setup.device)
        hooks.append(functools.partial(head.cancel_last_layer_gradients, current_epoch=EPOCH))

        def forward() -> Tensor:
            update_momentum(backbone, teacher, m=m)
            update_momentum(head, teacher_head, m=m)
            teacher_out = [teacher_head(teacher(v).flatten(start_dim=1)) for v in views[:2]]
            student_out = [head(backbone(v).flatten(start_dim=1)) for v in views]
            return criterion(teacher_out, student_out, epoch=EPOCH)

    elif setup.name == "byol":
        projector = modules.BYOLProjectionHead(feat, config.proj_hidden_dim, config.proj_dim)
        predictor = modules.BYOLPredictionHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        copy_from(lambda: _copy_stack(source.projector.mlp, projector.layers))
        copy_from(lambda: _copy_stack(source.predictor.mlp, predictor.layers))
        target, target_projector = copy.deepcopy(backbone), copy.deepcopy(projector)
        freeze(target)
        freeze(target_projector)
        model = nn.ModuleList([backbone, projector, predictor, target, target_projector])
        negative_cosine = loss.NegativeCosineSimilarity()

        def forward() -> Tensor:
            update_momentum(backbone, target, m=m)
            update_momentum(projector, target_projector, m=m)
            x0, x1 = views
            p0 = predictor(projector(backbone(x0).flatten(start_dim=1)))
            z0 = target_projector(target(x0).flatten(start_dim=1)).detach()
            p1 = predictor(projector(backbone(x1).flatten(start_dim=1)))
            z1 = target_projector(target(x1).flatten(start_dim=1)).detach()
            return 4 + 2 * (negative_cosine(p0, z1) + negative_cosine(p1, z0))  # = sum of 2 - 2 cos

    elif setup.name == "simclr":
        projector = modules.SimCLRProjectionHead(feat, config.proj_hidden_dim, config.proj_dim)
        copy_from(lambda: _copy_stack(source.projector.mlp, projector.layers))
        model = nn.ModuleList([backbone, projector])
        nt_xent = loss.NTXentLoss(temperature=config.temperature)

        def forward() -> Tensor:
            x0, x1 = views
            z0 = projector(backbone(x0).flatten(start_dim=1))
            z1 = projector(backbone(x1).flatten(start_dim=1))
            return 2 * nt_xent(z0, z1)  # lightly averages over 2N anchors; the reference sums two means

    else:
        raise ValueError(f"no lightly counterpart for {setup.name!r}")
    model.to(setup.device, memory_format=setup.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TrainConfig().lr * setup.batch / 256)
    optimizer.param_groups[0]["weight_decay"] = TrainConfig().weight_decay
    autocast = autocast_for(precision, setup.device)

    def run() -> Tensor:
        with autocast:
            value = forward()
        value.backward()
        for hook in hooks:
            hook()
        optimizer.step()
        optimizer.zero_grad()
        return value.detach()

    return Side(run, _trainable(model)), copied
