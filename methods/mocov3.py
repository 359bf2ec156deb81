"""MoCo v3: momentum contrast without a queue, for ResNets and Vision Transformers.

Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
arXiv 2104.02057. Reference: facebookresearch/moco-v3 (``moco/builder.py``, ``main_moco.py``,
``vits.py``), whose ResNet-50 and ViT numbers are both published (README and CONFIG.md).

- Base encoder ``f_q``: backbone, projector, predictor; momentum encoder ``f_k``: backbone and
  projector, an EMA of ``f_q``'s (no predictor), ``theta_k <- m theta_k + (1 - m) theta_q`` with m
  0.99 -> 1 on a half cosine (``--moco-m-cos``), applied by the runner through ``momentum_pairs``.
- Heads as the reference's ``_build_mlp``: Linear layers without bias, BN + ReLU after every hidden one,
  hidden 4096, output 256. ViT: projector 3 layers and predictor 2 layers, both ending in a BN without
  affine parameters. ResNet: projector 2 layers ending in that BN, predictor 2 layers without it. (The
  paper describes a 3-layer projector; its PyTorch code, whose ResNet-50 numbers the README publishes,
  builds 2 on ResNets: ``proj_layers`` sets either.)
- Loss (Algorithm 1): ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k) = 2 T CE(q k_all^T / T, positives)``
  with the keys of every rank (``moco_v3_loss``); T = 0.2 on ViTs (the README's --moco-t=.2), 1.0 on
  ResNets (main_moco.py's default, which the ResNet commands keep).
- Each view goes through the heads on its own (per-view BatchNorm statistics, global across ranks as the
  reference's SyncBN); a ViT backbone has no BatchNorm, so both views share one backbone forward.
- ViT stability trick (Sec. 4.2): the patch projection is a random, frozen layer
  (``freeze_patch_embed``, the reference's ``--stop-grad-conv1``), drawn as the reference draws it
  (Xavier-uniform, zero bias). Left out: the reference ViT's fixed 2-D sin-cos position embedding
  (sslbench's ViTs keep their learnt one) and its 12 heads in ViT-S (timm's has 6).
- Views: BYOL's asymmetric pair (blur 1.0 / 0.1, solarise 0 / 0.2); crop scale (0.08, 1) on ViTs and
  (0.2, 1) on ResNets (the README's --crop-min=.2).
- Evaluation reads the base encoder's backbone, as the reference's linear protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench import (
    Backbone,
    Method,
    PaperRecipe,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    ema_copy,
    moco_v3_loss,
    multicrop_forward,
    nearest_epochs,
    register_method,
)

# --recipe paper, ViT: the README's ViT-S/ViT-B command (--optimizer=adamw --lr=1.5e-4 --weight-decay=.1
# --epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2): lr x B/256, cosine to 0, no
# clipping, no stochastic depth (vits.py sets none).
VIT_RECIPE = PaperRecipe(
    "vit",
    "the MoCo v3 README's ViT command: --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --warmup-epochs=40 "
    "--stop-grad-conv1 --moco-m-cos --moco-t=.2 (--moco-m 0.99 by default)",
    train={
        "optimizer": "adamw",
        "lr": 1.5e-4,
        "min_lr": 0.0,
        "warmup_epochs": 40,
        "weight_decay": 0.1,
        "weight_decay_end": 0.1,
        "momentum": 0.9,
        "clip_grad": 0.0,
        "ema_momentum": 0.99,
        "ema_momentum_end": 1.0,
        "drop_path_rate": 0.0,
    },
    options={"temperature": 0.2, "freeze_patch_embed": True, "crop_min": 0.08},
)

# ResNet: CONFIG.md's ResNet-50 commands, LARS (momentum 0.9, trust 1e-3, biases and BN excluded) with 10
# warm-up epochs, T 1.0, --crop-min=.2, --moco-m-cos. (lr, weight decay, base momentum) per epochs:
RESNET_BY_EPOCHS = {
    100: (0.6, 1e-6, 0.99),  # main_moco.py's defaults
    300: (0.3, 1e-6, 0.99),  # --lr=.3
    1000: (0.3, 1.5e-6, 0.996),  # --lr=.3 --wd=1.5e-6 --moco-m=0.996
}


def resnet_recipe(epochs: int) -> PaperRecipe:
    """CONFIG.md's ResNet-50 command for the published run length nearest to ``epochs``."""
    length = nearest_epochs(epochs, RESNET_BY_EPOCHS)
    lr, weight_decay, momentum = RESNET_BY_EPOCHS[length]
    train = {
        "optimizer": "lars",
        "lr": lr,
        "min_lr": 0.0,
        "warmup_epochs": 10,
        "weight_decay": weight_decay,
        "weight_decay_end": weight_decay,
        "momentum": 0.9,
        "clip_grad": 0.0,
        "ema_momentum": momentum,
        "ema_momentum_end": 1.0,
    }
    options = {"temperature": 1.0, "crop_min": 0.2}
    return PaperRecipe(f"resnet, {length}-epoch values", "moco-v3 CONFIG.md (ResNet-50)", train, options)


@dataclass
class MoCoV3Config:
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    proj_layers: int | None = None  # None: 3 on a ViT, 2 on a ResNet (the reference's builder)
    temperature: float | None = None  # None: 0.2 on a ViT, 1.0 on a ResNet (the reference's commands)
    freeze_patch_embed: bool | None = None  # ViT: frozen random patch projection (None: on); False on ResNets
    crop_min: float | None = None  # None: 0.08 on a ViT, 0.2 on a ResNet (the reference's commands)

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        if self.temperature is not None and self.temperature <= 0:
            raise SSLBenchError(f"mocov3.temperature must be > 0, got {self.temperature}")
        if self.proj_layers is not None and self.proj_layers < 1:
            raise SSLBenchError(f"mocov3.proj_layers must be >= 1, got {self.proj_layers}")
        if self.crop_min is not None and not 0 < self.crop_min <= 1:
            raise SSLBenchError(f"mocov3.crop_min must be in (0, 1], got {self.crop_min}")


class MoCoV3MLP(nn.Module):
    """The reference's ``_build_mlp``: ``num_layers`` Linear layers without bias, BN + ReLU after each
    hidden one and, with ``last_bn``, a BN without affine parameters after the output (SimCLR's design,
    its scale dropped too). The output layer (and its BN) runs in fp32: the loss divides it by T."""

    def __init__(self, num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for layer in range(num_layers - 1):
            layers += [
                nn.Linear(in_dim if layer == 0 else hidden_dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
        self.hidden = nn.Sequential(*layers)
        output: list[nn.Module] = [nn.Linear(hidden_dim if num_layers > 1 else in_dim, out_dim, bias=False)]
        if last_bn:
            output.append(nn.BatchNorm1d(out_dim, affine=False))
        self.output = nn.Sequential(*output)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hidden(x)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.output(hidden.float())


def freeze_patch_projection(backbone: Backbone, frozen: bool) -> None:
    """Draw the ViT's patch projection as ``vits.py`` does (Xavier-uniform over fan-in 3 p^2 and fan-out
    the width, zero bias: a frozen layer keeps its draw, so its scale is part of the method), and freeze
    it when ``frozen`` (``--stop-grad-conv1``)."""
    projection = backbone.model.patch_embed.proj
    fan_in, fan_out = projection.weight[0].numel(), projection.weight.shape[0]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        projection.weight.uniform_(-bound, bound)
        projection.bias.zero_()
    projection.requires_grad_(not frozen)


@register_method("mocov3")
class MoCoV3(Method):
    paper = "Chen, Xie & He 2021, arXiv 2104.02057"
    Config = MoCoV3Config

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe:
        return VIT_RECIPE if family == "vit" else resnet_recipe(epochs)

    def __init__(self, backbone: Backbone, config: MoCoV3Config, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        vit = backbone.family == "vit"
        if config.proj_layers is None:
            config.proj_layers = 3 if vit else 2
        if config.temperature is None:
            config.temperature = 0.2 if vit else 1.0
        if config.crop_min is None:
            config.crop_min = 0.08 if vit else 0.2
        # A ResNet has no patch projection: the option does not apply and is recorded as off
        config.freeze_patch_embed = vit and config.freeze_patch_embed is not False
        if vit:
            freeze_patch_projection(backbone, config.freeze_patch_embed)
        self.projector = MoCoV3MLP(
            config.proj_layers, backbone.feat_dim, config.proj_hidden_dim, config.proj_dim, last_bn=True
        )
        # The ViT predictor ends in a BN too; the ResNet one does not (MoCo_ViT / MoCo_ResNet)
        self.predictor = MoCoV3MLP(2, config.proj_dim, config.pred_hidden_dim, config.proj_dim, last_bn=vit)
        self.key_backbone = ema_copy(backbone)
        self.key_projector = ema_copy(self.projector)

    def view_recipe(self) -> ViewRecipe:
        return ViewRecipe("asymmetric", global_scale=(self.config.crop_min, 1.0))

    def _project(self, backbone: Backbone, projector: nn.Module, views: list[Tensor]) -> list[Tensor]:
        """One projection per view, each view batch-normalised on its own; a ViT backbone (no BatchNorm)
        takes both views in one forward, which changes nothing but the speed."""
        if backbone.family == "vit":
            return [projector(features) for features in multicrop_forward(backbone, views)]
        return multicrop_forward(backbone, views, projector, per_view_batch_norm=True)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        with torch.no_grad():  # keys first: their activations are gone before the queries' build up
            k1, k2 = self._project(self.key_backbone, self.key_projector, views[:2])
        z1, z2 = self._project(self.backbone, self.projector, views[:2])
        q1, q2 = self.predictor(z1), self.predictor(z2)
        temperature = self.config.temperature
        loss = moco_v3_loss(q1, k2, temperature) + moco_v3_loss(q2, k1, temperature)
        return StepOutput(loss, embeddings=torch.cat([z1, z2]))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]
