"""MoCo v2: momentum contrast with SimCLR's MLP head and augmentation.

Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297,
on MoCo (He, Fan, Wu, Xie & Girshick 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning", arXiv 1911.05722). Reference: facebookresearch/moco (``moco/builder.py``, ``main_moco.py``).

- Query encoder ``f_q`` (backbone + MLP head) and key encoder ``f_k``, a copy of it updated only by
  ``theta_k <- m theta_k + (1 - m) theta_q`` (MoCo Eq. 2; m = 0.999), applied by the runner through
  ``momentum_pairs`` on the run's shared schedule (``--recipe paper``: 0.999 constant).
- Head (MoCo v2's ``--mlp``): Linear(d, d) -> ReLU -> Linear(d, 128), biases, no BatchNorm, d the
  backbone's feature width (2048 on ResNet-50), on both encoders (the key head an EMA too).
- InfoNCE (MoCo Eq. 1): ``L_q = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_i exp(q.k_i / T))`` with
  T = 0.2, the positive key first, the negatives ``k_i`` a queue of K past keys
  (``info_nce_with_queue``); then the keys of every rank replace the oldest entries (``enqueue``).
  One direction, query from view 1 and key from view 2, as the reference.
- Queue: a buffer of K L2-normalised keys (65536 in the paper; 4096 on small images, where a dataset
  of ~50k images would fill 65536 slots with stale keys of the query's own image), initialised as the
  reference (a normal draw, normalised); any K works, a multiple of the batch or not.
- Shuffling BN (He et al. 2020, Sec. 3.3; the reference's ``_batch_shuffle_ddp``): queries are
  batch-normalised in groups of ``bn_group_size`` consecutive images of the global batch (the reference's
  32 per GPU at batch 256 on 8 GPUs) and keys in as many groups of every G-th image, a fixed shuffle, so
  a query's statistics and its positive key's share 1/G of their images, as the reference's random
  shuffle over G GPUs does in expectation, and the positive cannot be found by a batch signature it
  shares with its query. The groups follow each image's place in the global batch, with sums
  all-reduced over the ranks (``GroupedBatchNorm``), so 1 process and N ranks train alike. At least 2
  groups: a batch under 64 has 2. ``shuffle_bn=false`` normalises both over the whole batch instead.
- Views: MoCo v2's augmentation, SimCLR's at strength 0.5 (ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
  grayscale p 0.2, blur p 0.5, flip) on crops of scale (0.2, 1), both views alike.
- Evaluation reads the query encoder's backbone, as the paper's linear protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    Method,
    PaperRecipe,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    batch_norm_groups,
    contiguous_groups,
    ema_copy,
    enqueue,
    info_nce_with_queue,
    register_method,
    strided_groups,
    use_grouped_batch_norm,
    world_size,
)

# --recipe paper: the MoCo v2 README's command (main_moco.py --lr 0.03 --batch-size 256 --mlp --moco-t 0.2
# --aug-plus --cos): SGD, momentum 0.9, wd 1e-4, cosine to 0 without warm-up or clipping, key encoder
# momentum 0.999 constant. The run keeps its scale (the paper's 200 epochs, queue 65536).
RESNET_RECIPE = PaperRecipe(
    "resnet",
    "the MoCo v2 README's command: main_moco.py --lr 0.03 --mlp --moco-t 0.2 --aug-plus --cos "
    "(--wd 1e-4, --moco-m 0.999 by default)",
    train={
        "optimizer": "sgd",
        "lr": 0.03,
        "min_lr": 0.0,
        "warmup_epochs": 0,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "momentum": 0.9,
        "clip_grad": 0.0,
        "ema_momentum": 0.999,
        "ema_momentum_end": 0.999,
    },
    options={"temperature": 0.2},
)


@dataclass
class MoCoV2Config:
    proj_hidden_dim: int | None = None  # None: the backbone's feature width, as the reference's mlp
    proj_dim: int = 128
    queue_size: int | None = None  # None: 65536 (the paper) above 64 px, 4096 on small images
    temperature: float = 0.2
    shuffle_bn: bool = True  # the paper's shuffling BN; false: global BatchNorm for queries and keys
    bn_group_size: int = 32  # images per BatchNorm group: the reference's per-GPU batch (256 on 8 GPUs)

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        if self.temperature <= 0:
            raise SSLBenchError(f"mocov2.temperature must be > 0, got {self.temperature}")
        if self.queue_size is not None and self.queue_size < 1:
            raise SSLBenchError(f"mocov2.queue_size must be >= 1, got {self.queue_size}")
        for name in ("proj_hidden_dim", "proj_dim", "bn_group_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SSLBenchError(f"mocov2.{name} must be >= 1, got {value}")


class MoCoV2Head(nn.Module):
    """MoCo v2's MLP head: Linear -> ReLU -> Linear, with biases and no BatchNorm (the reference's
    ``--mlp``: the encoder's fc preceded by a Linear and a ReLU). The output layer runs in fp32, as every
    sslbench head's, since the loss divides its similarities by T."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True))
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.hidden(x)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.out(hidden.float())


@register_method("mocov2")
class MoCoV2(Method):
    paper = "Chen, Fan, Girshick & He 2020, arXiv 2003.04297"
    Config = MoCoV2Config

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return RESNET_RECIPE if family == "resnet" else None  # the paper trained ResNets only

    def __init__(self, backbone: Backbone, config: MoCoV2Config, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if config.proj_hidden_dim is None:
            config.proj_hidden_dim = backbone.feat_dim
        if config.queue_size is None:
            config.queue_size = 4096 if context.image_size <= SMALL_IMAGE_MAX else 65536
        self.head = MoCoV2Head(backbone.feat_dim, config.proj_hidden_dim, config.proj_dim)
        self.key_backbone = ema_copy(backbone)
        self.key_head = ema_copy(self.head)
        if config.shuffle_bn:  # both encoders: queries and keys are normalised by groups
            use_grouped_batch_norm(self.backbone)
            use_grouped_batch_norm(self.key_backbone)
        # The reference's draw: randn(dim, K) normalised over dim; kept as (K, dim) rows for enqueue
        queue = F.normalize(torch.randn(config.proj_dim, config.queue_size), dim=0).t().contiguous()
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def view_recipe(self) -> ViewRecipe:
        return ViewRecipe("symmetric", global_scale=(0.2, 1.0), color_strength=0.5)

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        batch, device = views[0].shape[0], views[0].device
        groups = self._bn_groups(batch)
        # keys first: their activations are gone before the queries' build up
        key_groups = strided_groups(batch, groups, device)
        with torch.no_grad(), batch_norm_groups(self.key_backbone, key_groups, groups):
            k = self.key_head(self.key_backbone(views[1]))
        with batch_norm_groups(self.backbone, contiguous_groups(batch, groups, device), groups):
            q = self.head(self.backbone(views[0]))
        # A copy of the queue, as the reference's queue.clone(): backward reads it after enqueue overwrote it
        loss = info_nce_with_queue(q, k, self.queue.clone(), self.config.temperature)
        logs: dict = {}
        if step.diagnose:
            logs["contrast_top1"] = self._top1(q, k)
        enqueue(self.queue, self.queue_ptr, k)
        return StepOutput(loss, logs, embeddings=q)

    def _bn_groups(self, local_batch: int) -> int:
        """G for this batch: global batch / bn_group_size, at least 2 (a shuffle needs two groups)."""
        global_batch = local_batch * world_size()
        return min(global_batch, max(2, global_batch // self.config.bn_group_size))

    @torch.no_grad()
    def _top1(self, q: Tensor, k: Tensor) -> Tensor:
        """How often the positive key outscores every queued key (the reference's Acc@1 of the (1+K)-way
        task): near 1 means the task has become easy, near 1/(1+K) that nothing is learnt."""
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        with torch.autocast(q.device.type, enabled=False):
            positive, negatives = (q * k).sum(dim=-1), q @ self.queue.t()
        return (positive > negatives.amax(dim=-1)).float().mean()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.head, self.key_head)]
