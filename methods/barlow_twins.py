"""Barlow Twins: self-supervised learning via redundancy reduction.

Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", arXiv 2103.03230.

- Two views of each image go through one network, the backbone then the projector ``Z = g(f(Y))``
  (Sec. 2, Fig. 1); there is no teacher, predictor, stop-gradient or negative.
- Projector (Sec. 2, "Implementation details"; reference ``--projector 8192-8192-8192``): three Linear
  layers without bias, the first two followed by BatchNorm and ReLU. On images of <= 64 px both widths
  default to 2048, as solo-learn's CIFAR config (``scripts/pretrain/cifar/barlow.yaml``).
- Loss (Eq. 1-2): ``L = sum_i (1 - C_ii)^2 + lambda * sum_i sum_{j != i} C_ij^2``, ``C`` the
  cross-correlation of the two views' embeddings, each dimension standardised over the global batch,
  lambda = 0.0051 (reference default); see ``sslbench.losses.barlow_twins_loss``.
- Each view goes through the networks on its own, so BatchNorm statistics are per view (reference
  ``BarlowTwins.forward``).
- Views: the reference's ``Transform``, BYOL's asymmetric pair (blur p 1.0 / 0.1, solarise p 0 / 0.2).
- Evaluation uses the backbone ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    Method,
    MLPHead,
    PaperRecipe,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    barlow_twins_loss,
    multicrop_forward,
    register_method,
    two_views,
)

# --recipe paper: the reference's command (facebookresearch/barlowtwins README: ``python main.py``, every
# flag at main.py's default): LARS (eta 1e-3, momentum 0.9; biases and BN out of weight decay and of the
# adaptation), batch 2048 for 1000 epochs, lr x B/256 with 10 warm-up epochs then a cosine down to
# 0.001 x the peak (``adjust_learning_rate``), no clipping. Weight decay 1e-6, main.py's value in every
# version of the code (the paper's text says 1.5e-6). The reference gives weights lr 0.2 and biases / BN
# 0.0048; the runner has one lr: the weights' 0.2, which VICReg's reference (built on this code) also
# gives its biases and BN. min_lr is absolute here: the reference's end at its batch, 0.001 x 0.2 x 8.
REFERENCE_BATCH = 2048
LR = 0.2
RESNET_RECIPE = PaperRecipe(
    "resnet, one lr for weights and biases",
    "the Barlow Twins README's command, main.py's defaults: --batch-size 2048 --epochs 1000 "
    "--learning-rate-weights 0.2 (here for every parameter; --learning-rate-biases 0.0048 not applied) "
    "--weight-decay 1e-6",
    train={
        "optimizer": "lars",
        "lr": LR,
        "min_lr": 0.001 * LR * REFERENCE_BATCH / 256,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "momentum": 0.9,
        "clip_grad": 0.0,
    },
)


@dataclass
class BarlowTwinsConfig:
    proj_hidden_dim: int | None = None  # None: 8192 above 64 px (the paper), 2048 on small images
    proj_dim: int | None = None  # None: 8192 above 64 px (the paper), 2048 on small images
    proj_layers: int = 3  # Linear layers of the projector (8192-8192-8192: three)
    lambda_offdiag: float = 0.0051  # the reference's --lambd

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        for name in ("proj_hidden_dim", "proj_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SSLBenchError(f"barlow_twins.{name} must be >= 1 or null, got {value}")
        if self.proj_layers < 1:
            raise SSLBenchError(f"barlow_twins.proj_layers must be >= 1, got {self.proj_layers}")
        if self.lambda_offdiag < 0:
            raise SSLBenchError(f"barlow_twins.lambda_offdiag must be >= 0, got {self.lambda_offdiag}")


def barlow_projector(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> MLPHead:
    """The reference's projector: Linear (no bias) -> BN -> ReLU per hidden layer, a last Linear without
    bias. A bias before BatchNorm is cancelled by its centring, so the reference has none."""
    projector = MLPHead(in_dim, hidden_dim, out_dim, num_layers=num_layers)
    for layer in projector.mlp[:-1]:
        if isinstance(layer, nn.Linear):
            layer.register_parameter("bias", None)
    return projector


@register_method("barlow_twins")
class BarlowTwins(Method):
    paper = "Zbontar et al. 2021, arXiv 2103.03230"
    Config = BarlowTwinsConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return RESNET_RECIPE if family == "resnet" else None  # the paper trained ResNets only

    def __init__(self, backbone: Backbone, config: BarlowTwinsConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        width = 2048 if context.image_size <= SMALL_IMAGE_MAX else 8192
        if config.proj_hidden_dim is None:
            config.proj_hidden_dim = width
        if config.proj_dim is None:
            config.proj_dim = width
        self.projector = barlow_projector(
            backbone.feat_dim, config.proj_hidden_dim, config.proj_dim, config.proj_layers
        )

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=True)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        z1, z2 = multicrop_forward(self.backbone, views, self.projector, per_view_batch_norm=True)
        loss = barlow_twins_loss(z1, z2, self.config.lambda_offdiag)
        logs: dict = {}
        if step.diagnose:
            logs = self._loss_terms(z1, z2)
        return StepOutput(loss, logs, embeddings=torch.cat([z1, z2]))

    @torch.no_grad()
    def _loss_terms(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        """The two terms unweighted (the shared loss at lambda 0 and 1): the invariance term falls as the
        views agree, the redundancy term shows how far the dimensions are from decorrelated."""
        invariance = barlow_twins_loss(z1, z2, 0.0)
        return {"invariance": invariance, "redundancy": barlow_twins_loss(z1, z2, 1.0) - invariance}
