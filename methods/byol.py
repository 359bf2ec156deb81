"""BYOL: Bootstrap Your Own Latent.

Grill et al. 2020, "Bootstrap your own latent: A new approach to self-supervised learning",
arXiv 2006.07733.

- Online network: backbone ``f_theta``, projector ``g_theta`` (MLP 4096 -> 256 with BN, no bias on the
  output layer, haiku's truncated-normal init: reference ``networks.MLP``), predictor ``q_theta`` (same
  shape). Target network: ``f_xi, g_xi``, initialised from its own draw (reference
  ``byol_experiment.py``), then an EMA of the online one, ``xi <- tau xi + (1 - tau) theta`` with tau
  0.996 -> 1 on a cosine (Eq. 1, Sec. 3.3).
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
    PaperRecipe,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    byol_loss,
    create_backbone,
    ema_copy,
    init_linears,
    multicrop_forward,
    nearest_epochs,
    register_method,
    two_views,
)

# --recipe paper: the reference's values by the length of the run (byol/configs/byol.py: _LR_PRESETS,
# _WD_PRESETS, _EMA_PRESETS); LARS (eta 1e-3, momentum 0.9, biases and BN excluded), lr x B/256 with 10
# warm-up epochs then a cosine to 0 (utils/schedules.py), EMA 1 - (1 - base) (cos + 1) / 2 up to 1.
# (lr, weight decay, base EMA) per number of epochs:
PUBLISHED_BY_EPOCHS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}


def lars_recipe(epochs: int) -> PaperRecipe:
    """The reference's ImageNet recipe for the published run length nearest to ``epochs``."""
    length = nearest_epochs(epochs, PUBLISHED_BY_EPOCHS)
    lr, weight_decay, ema = PUBLISHED_BY_EPOCHS[length]
    train = {
        "optimizer": "lars",
        "lr": lr,
        "min_lr": 0.0,
        "warmup_epochs": 10,
        "weight_decay": weight_decay,
        "weight_decay_end": weight_decay,
        "momentum": 0.9,
        "clip_grad": 0.0,
        "ema_momentum": ema,
        "ema_momentum_end": 1.0,
    }
    return PaperRecipe(f"resnet, {length}-epoch values", "byol/configs/byol.py", train)


TARGET_INITS = ("independent", "copy")


@dataclass
class BYOLConfig:
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    # independent: the target drawn from its own seed, as the reference (byol_experiment.py's rng_target);
    # copy: the target starts equal to the online network, as DINO's teacher
    target_init: str = "independent"

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        if self.target_init not in TARGET_INITS:
            raise SSLBenchError(
                f"byol.target_init must be one of {', '.join(TARGET_INITS)}, got '{self.target_init}'"
            )


@register_method("byol")
class BYOL(Method):
    paper = "Grill et al. 2020, arXiv 2006.07733"
    Config = BYOLConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return lars_recipe(epochs) if family == "resnet" else None  # the paper trained ResNets only

    def __init__(self, backbone: Backbone, config: BYOLConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        self.projector = self._projector(backbone.feat_dim)
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        init_linears(self.predictor, std=lambda fan_in: fan_in**-0.5, truncated=True)  # haiku's init
        if config.target_init == "copy":
            self.target_backbone = ema_copy(backbone)
            self.target_projector = ema_copy(self.projector)
        else:  # a second draw of the same networks (the EMA then pulls it toward the online one)
            self.target_backbone = ema_copy(create_backbone(backbone.arch, context.image_size))
            self.target_projector = ema_copy(self._projector(backbone.feat_dim))

    def _projector(self, feat_dim: int) -> MLPHead:
        projector = MLPHead(feat_dim, self.config.proj_hidden_dim, self.config.proj_dim)
        init_linears(projector, std=lambda fan_in: fan_in**-0.5, truncated=True)  # haiku's Linear init
        return projector

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
