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
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    multicrop_forward,
    register_method,
    two_views,
)

SGD_RECIPE = {
    "optimizer": "sgd",
    "lr": 0.1,
    "weight_decay": 1e-4,
    "weight_decay_end": 1e-4,
    "warmup_epochs": 5,
    "clip_grad": 0.0,
}


@register_method("supervised")
class Supervised(Method):
    paper = "supervised baseline (cross-entropy), as in Caron et al. 2021, Table 2"
    paper_recipe = {"resnet": SGD_RECIPE}  # the standard ResNet recipe: SGD, lr 0.1 x B/256, wd 1e-4

    def __init__(self, backbone: Backbone, config: object, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        self.classifier = nn.Linear(backbone.feat_dim, context.num_classes)

    def view_recipe(self) -> ViewRecipe:
        return two_views(asymmetric=False)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        logits = multicrop_forward(self.backbone, views, self.classifier)
        loss = sum(F.cross_entropy(out, labels) for out in logits) / len(logits)
        return StepOutput(loss, embeddings=torch.cat(logits))
