"""VICReg: variance-invariance-covariance regularization.

Bardes, Ponce & LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", arXiv 2105.04906.

- Two views go through one encoder ``f`` (the backbone) and one expander ``h``: ``Z = h(f(X))``
  (Sec. 3.1); no teacher, predictor, stop-gradient or negative.
- Expander (the paper's implementation details; reference ``Projector``, ``--mlp 8192-8192-8192``):
  three Linear layers, the first two with a bias and followed by BatchNorm and ReLU, the last without
  bias. On images of <= 64 px both widths default to 2048, as solo-learn's CIFAR config
  (``scripts/pretrain/cifar/vicreg.yaml``).
- Loss (Eq. 1-6): ``lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')]`` with the variance hinge
  ``v`` (gamma 1, eps 1e-4), the covariance term ``c`` and the invariance MSE ``s``, weighted 25 / 25 / 1
  as the reference code (its halved variance term: see ``sslbench.losses.vicreg_loss``); variance and
  covariance over the embeddings of every rank.
- Each view goes through the networks on its own, so BatchNorm statistics are per view (reference
  ``VICReg.forward``).
- Views: the reference's ``augmentations.TrainTransform``, BYOL's asymmetric pair (blur p 1.0 / 0.1,
  solarise p 0 / 0.2).
- Evaluation uses the encoder ``f``, the representation the paper evaluates (Sec. 3.1).
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
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    multicrop_forward,
    nearest_epochs,
    register_method,
    two_views,
    vicreg_loss,
)

# --recipe paper: the reference README's two commands (facebookresearch/vicreg), every other flag at
# main_vicreg.py's default: LARS (eta 1e-3, momentum 0.9, one lr for all parameters; biases and BN out of
# weight decay and of the adaptation), lr x B/256 with 10 warm-up epochs then a cosine down to 0.001 x
# the peak (``adjust_learning_rate``), weight decay 1e-6, no clipping. min_lr is absolute here: the
# reference's end at the command's batch.
# (base lr, the command's batch) per number of epochs:
PUBLISHED_BY_EPOCHS = {
    100: (0.3, 512),  # README, single node: --epochs 100 --batch-size 512 --base-lr 0.3
    1000: (0.2, 2048),  # README, SLURM (the paper's 73.2%): --epochs 1000 --batch-size 2048 --base-lr 0.2
}


def lars_recipe(epochs: int) -> PaperRecipe:
    """The reference command for the published run length nearest to ``epochs``."""
    length = nearest_epochs(epochs, PUBLISHED_BY_EPOCHS)
    lr, batch = PUBLISHED_BY_EPOCHS[length]
    train = {
        "optimizer": "lars",
        "lr": lr,
        "min_lr": 0.001 * lr * batch / 256,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "momentum": 0.9,
        "clip_grad": 0.0,
    }
    source = f"the VICReg README's {length}-epoch command: --batch-size {batch} --base-lr {lr} (wd 1e-6)"
    return PaperRecipe(f"resnet, {length}-epoch command", source, train)


@dataclass
class VICRegConfig:
    proj_hidden_dim: int | None = None  # None: 8192 above 64 px (the paper), 2048 on small images
    proj_dim: int | None = None  # None: 8192 above 64 px (the paper), 2048 on small images
    proj_layers: int = 3  # Linear layers of the expander (8192-8192-8192: three)
    sim_coeff: float = 25.0  # lambda, invariance
    std_coeff: float = 25.0  # mu as the reference scales it (the paper's Eq. 6 mu = 12.5)
    cov_coeff: float = 1.0  # nu, covariance
    eps: float = 1e-4  # inside the variance's square root

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        for name in ("proj_hidden_dim", "proj_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SSLBenchError(f"vicreg.{name} must be >= 1 or null, got {value}")
        if self.proj_layers < 1:
            raise SSLBenchError(f"vicreg.proj_layers must be >= 1, got {self.proj_layers}")
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, name) < 0:
                raise SSLBenchError(f"vicreg.{name} must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise SSLBenchError(f"vicreg.eps must be > 0, got {self.eps}")


# The loss's three terms, each alone at unit weight (sim, std, cov), for the logs
TERMS = {"invariance": (1.0, 0.0, 0.0), "variance": (0.0, 1.0, 0.0), "covariance": (0.0, 0.0, 1.0)}


@register_method("vicreg")
class VICReg(Method):
    paper = "Bardes et al. 2022, arXiv 2105.04906"
    Config = VICRegConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return lars_recipe(epochs) if family == "resnet" else None  # the paper trained ResNets only

    def __init__(self, backbone: Backbone, config: VICRegConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        width = 2048 if context.image_size <= SMALL_IMAGE_MAX else 8192
        if config.proj_hidden_dim is None:
            config.proj_hidden_dim = width
        if config.proj_dim is None:
            config.proj_dim = width
        # The reference's Projector: a bias on the hidden Linear layers, none on the last one
        self.projector = MLPHead(
            backbone.feat_dim, config.proj_hidden_dim, config.proj_dim, num_layers=config.proj_layers
        )

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=True)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        x, y = multicrop_forward(self.backbone, views, self.projector, per_view_batch_norm=True)
        cfg = self.config
        loss = vicreg_loss(x, y, cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff, cfg.eps)
        logs: dict = {}
        if step.diagnose:
            logs = self._loss_terms(x, y)
        return StepOutput(loss, logs, embeddings=torch.cat([x, y]))

    @torch.no_grad()
    def _loss_terms(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The three terms unweighted: a variance term near 1 - sqrt(eps) means collapse, a falling
        invariance with a flat variance means the views agree without collapsing."""
        return {name: vicreg_loss(x, y, *weights, eps=self.config.eps) for name, weights in TERMS.items()}
