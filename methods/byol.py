"""BYOL: Bootstrap Your Own Latent.

Grill et al. 2020, "Bootstrap your own latent: A new approach to self-supervised learning",
arXiv 2006.07733.

- Online network: backbone ``f_theta``, projector ``g_theta`` (MLP 4096 -> 256 with BN, no bias on the
  output layer, haiku's truncated-normal init: reference ``networks.MLP``), predictor ``q_theta`` (same
  shape). Target network: ``f_xi, g_xi``, an EMA of the online one,
  ``xi <- tau xi + (1 - tau) theta`` with tau 0.996 -> 1 on a cosine (Eq. 1, Sec. 3.3).
- Loss (Eq. 2): ``L = 2 - 2 <q(z), z'> / (||q(z)|| ||z'||)`` with the target's projection ``z'`` of
  the other view, symmetrised (``L + L~``) by swapping the views.
- Views: the paper's asymmetric pair (blur p 1.0 / 0.1, solarise p 0 / 0.2).
- Each view goes through the networks on its own, so BatchNorm statistics are per view (reference code).
- Evaluation uses the online encoder ``f_theta``, as the paper keeps it (Sec. 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench import (
    Backbone,
    Method,
    MLPHead,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    byol_loss,
    ema_copy,
    init_linears,
    multicrop_forward,
    register_method,
    two_views,
)

LARS_RECIPE = {
    "optimizer": "lars",
    "lr": 0.2,
    "weight_decay": 1.5e-6,
    "weight_decay_end": 1.5e-6,
    "warmup_epochs": 10,
    "clip_grad": 0.0,
}


@dataclass
class BYOLConfig:
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096


@register_method("byol")
class BYOL(Method):
    paper = "Grill et al. 2020, arXiv 2006.07733"
    Config = BYOLConfig
    paper_recipe = {"resnet": LARS_RECIPE}  # Sec. 3.3: LARS, lr 0.2 x B/256, wd 1.5e-6, 10 warm-up epochs

    def __init__(self, backbone: Backbone, config: BYOLConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        self.projector = MLPHead(backbone.feat_dim, config.proj_hidden_dim, config.proj_dim)
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        for head in (self.projector, self.predictor):  # haiku's Linear init, as the reference's
            init_linears(head, std=lambda fan_in: fan_in**-0.5, truncated=True)
        self.target_backbone = ema_copy(backbone)
        self.target_projector = ema_copy(self.projector)

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=True)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        online = multicrop_forward(self.backbone, views, self.projector, per_view_batch_norm=True)
        p1, p2 = (self.predictor(z) for z in online)
        with torch.no_grad():
            t1, t2 = multicrop_forward(
                self.target_backbone, views, self.target_projector, per_view_batch_norm=True
            )
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return StepOutput(loss, embeddings=torch.cat(online))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]
