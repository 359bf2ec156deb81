"""SimCLR: a simple framework for contrastive learning of visual representations.

Chen et al. 2020, arXiv 2002.05709.

- Encoder ``f`` (the backbone) and projection head ``g``: MLP with one hidden layer as wide as the
  features, output 128 (Sec. 2.1); as the reference's ``projection_head``: BN on both layers, no Linear
  biases, the last BN without a shift (``center=False``), weights drawn from N(0, 0.01^2). The loss is
  on ``z = g(f(x))``.
- NT-Xent (Eq. 1): ``l(i, j) = -log exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)``
  over the 2N views of a batch, scaled as the reference code: the mean over each view's anchors,
  summed over the two views (``loss_a + loss_b``; twice Algorithm 1's average over all positive pairs).
- tau: 0.5 on small images (the paper's CIFAR-10 recipe, Appendix B.9), 0.1 at ImageNet scale.
- Views: two draws of the same augmentation (crop, flip, colour distortion, grayscale, blur).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    Method,
    MLPHead,
    PaperRecipe,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    init_linears,
    multicrop_forward,
    nt_xent_loss,
    register_method,
    two_views,
)

# --recipe paper: LARS (momentum 0.9, biases and BN excluded), lr x B/256 (the reference's linear scaling)
# with 10 warm-up epochs then a cosine to 0, no clipping; no EMA.
_LARS = {"optimizer": "lars", "min_lr": 0.0, "warmup_epochs": 10, "momentum": 0.9, "clip_grad": 0.0}
LARS_RECIPE = PaperRecipe(
    "resnet",
    "the SimCLR (v1) code's defaults (the paper's Sec. B.1): lr 0.3 x B/256, wd 1e-6, temperature 0.1",
    train={"lr": 0.3, "weight_decay": 1e-6, "weight_decay_end": 1e-6} | _LARS,
    options={"temperature": 0.1},
)
LARS_CIFAR_RECIPE = PaperRecipe(
    "resnet, CIFAR",
    "the SimCLR (v1) README's CIFAR-10 command: --learning_rate 1.0 --weight_decay 1e-6 --temperature 0.5",
    train={"lr": 1.0, "weight_decay": 1e-6, "weight_decay_end": 1e-6} | _LARS,
    options={"temperature": 0.5},
)


@dataclass
class SimCLRConfig:
    proj_hidden_dim: int | None = None  # None: the backbone's feature width, as the reference code
    proj_dim: int = 128
    temperature: float | None = None  # None: 0.5 on small images, 0.1 at ImageNet scale


@register_method("simclr")
class SimCLR(Method):
    paper = "Chen et al. 2020, arXiv 2002.05709"
    Config = SimCLRConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        if family != "resnet":  # the paper trained ResNets only
            return None
        return LARS_CIFAR_RECIPE if image_size <= SMALL_IMAGE_MAX else LARS_RECIPE

    def __init__(self, backbone: Backbone, config: SimCLRConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if config.temperature is None:
            config.temperature = 0.5 if context.image_size <= SMALL_IMAGE_MAX else 0.1
        if config.proj_hidden_dim is None:
            config.proj_hidden_dim = backbone.feat_dim
        self.projector = MLPHead(backbone.feat_dim, config.proj_hidden_dim, config.proj_dim, last_bn=True)
        init_linears(self.projector, std=lambda _: 0.01, truncated=False)  # the reference's dense init

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=False)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        z1, z2 = multicrop_forward(self.backbone, views, self.projector)
        return StepOutput(nt_xent_loss(z1, z2, self.config.temperature), embeddings=torch.cat([z1, z2]))
