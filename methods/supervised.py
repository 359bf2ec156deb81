"""Supervised reference: cross-entropy on the labels, same backbone, views and schedule.

The "Supervised" row of the DINO paper's tables (Caron et al. 2021, arXiv 2104.14294, Table 2),
trained here under the run's shared schedule so the comparison isolates the objective. Each of the
two augmented views is classified and the losses averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench import (
    Backbone,
    Method,
    PaperRecipe,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    multicrop_forward,
    register_method,
    two_views,
)

# --recipe paper: the standard ResNet recipe (Goyal et al. 2017: SGD momentum 0.9, lr 0.1 x B/256 with a
# 5-epoch warm-up, weight decay 1e-4), on the cosine every pair shares, to 0.
SGD_RECIPE = PaperRecipe(
    "resnet",
    "SGD, lr 0.1 x B/256, weight decay 1e-4, 5 warm-up epochs (Goyal et al. 2017)",
    train={
        "optimizer": "sgd",
        "lr": 0.1,
        "min_lr": 0.0,
        "warmup_epochs": 5,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "momentum": 0.9,
        "clip_grad": 0.0,
    },
)


@register_method("supervised")
class Supervised(Method):
    paper = "supervised baseline (cross-entropy), as in Caron et al. 2021, Table 2"
    needs_labels = True

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return SGD_RECIPE if family == "resnet" else None

    def __init__(self, backbone: Backbone, config: object, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        self.classifier = nn.Linear(backbone.feat_dim, context.num_classes)

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=False)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        logits = multicrop_forward(self.backbone, views, self.classifier)
        loss = sum(F.cross_entropy(out, labels) for out in logits) / len(logits)
        return StepOutput(loss, embeddings=torch.cat(logits))
