"""SimSiam as a plugin: Chen & He 2021, "Exploring Simple Siamese Representation Learning", arXiv 2011.10566.

Loss (Eq. 1-2, Algorithm 1): D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine similarity.
Run it with: sslbench run --plugin examples/simsiam.py --methods simsiam,byol --arch resnet18
"""

from dataclasses import dataclass

import torch.nn.functional as F

from sslbench import Method, MLPHead, StepOutput, multicrop_forward, register_method, two_views


@dataclass
class SimSiamConfig:
    proj_dim: int = 2048
    pred_hidden_dim: int = 512


@register_method("simsiam")
class SimSiam(Method):
    paper = "Chen & He 2021, arXiv 2011.10566"
    Config = SimSiamConfig

    def __init__(self, backbone, config, context):
        super().__init__(backbone, config, context)
        self.projector = MLPHead(
            backbone.feat_dim, config.proj_dim, config.proj_dim, num_layers=3, last_bn=True
        )
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)

    def view_recipe(self):
        return two_views()

    def training_step(self, views, labels, step):
        z1, z2 = multicrop_forward(self.backbone, views, self.projector)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        similarity = F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()
        return StepOutput(-similarity / 2)
