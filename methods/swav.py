"""SwAV: swapping assignments between views.

Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", arXiv 2006.09882.

- Features ``z = g(f(x)) / ||g(f(x))||``: the backbone ``f``, then the reference's projection head ``g``
  (``src/resnet50.py``: Linear 2048 -> BN -> ReLU -> Linear 128, both Linear layers with a bias, PyTorch's
  default init), L2-normalised.
- Prototypes ``C``: a bias-free Linear layer (3000 prototypes at ImageNet scale), its rows L2-normalised
  without gradient at the start of every step, before the forward (``main_swav.py``), so the scores
  ``z^T c_k`` are cosines. Frozen during the first epoch: the reference's ``freeze_prototypes_niters``
  (313 iterations at batch 4096, one epoch of ImageNet), here a ``ParameterRule``.
- Codes (Sec. 3.1): ``Q* = Diag(u) exp(C^T Z / eps) Diag(v)``, the entropy-regularised equal partition of
  the batch of every rank among the prototypes, 3 Sinkhorn-Knopp iterations at eps = 0.05, without
  gradient, on the two global crops only (``crops_for_assign = [0, 1]``); see ``sinkhorn_knopp``.
- Swapped prediction (Eq. 1-2): ``l(z_t, q_s) = -sum_k q_s^(k) log p_t^(k)`` with
  ``p_t = softmax(z_t^T C / tau)``, tau = 0.1; with multi-crop (Sec. 3.2) the codes of each global crop
  are predicted from every other crop; see ``swav_loss``.
- Multi-crop 2 + 6 (``--size_crops 224 96 --nmb_crops 2 6 --min_scale_crops 0.14 0.05
  --max_scale_crops 1. 0.14``) with SimCLR's colour distortion (strength 1) and blur on every crop:
  the 'symmetric' views with local crops.
- Small batches (Sec. 3.1, "working with small batches"): an optional queue of past embeddings of the
  global crops; from ``epoch_queue_starts`` on it fills, and once full its scores against the current
  prototypes join the Sinkhorn problem (``codes_with_queue``). Off by default, as the batch-4096 commands.
- Evaluation uses the backbone ``f`` (no teacher).
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
    ParameterRule,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    codes_with_queue,
    enqueue,
    entropy,
    multicrop_forward,
    rank,
    register_method,
    swav_loss,
    world_size,
)

# --recipe paper: the batch-4096 commands (scripts/swav_800ep_pretrain.sh, the README's 75.3% model; the
# 100-, 200- and 400-epoch scripts differ only in --epochs): LARC (trust 1e-3, momentum 0.9, no
# clipping) with --base_lr 4.8 at batch 4096, i.e. 0.3 x B/256, a 10-epoch warm-up then a cosine to
# --final_lr 0.0048 (min_lr is absolute here: the reference's end at its batch), --wd 1e-6. The warm-up
# starts at 0, the runner's, not at --start_warmup 0.3. The command's SwAV options are this Config's
# defaults, restated so the recipe replaces a user's values. The batch-256 commands (lr 0.6, final 0.0006,
# no warm-up, --freeze_prototypes_niters 5005, queue 3840 from epoch 15) are not the recipe.
LARS_RECIPE = PaperRecipe(
    "resnet, batch-4096 command",
    "scripts/swav_800ep_pretrain.sh (--batch_size 64 on 64 GPUs): --base_lr 4.8 --final_lr 0.0048 "
    "--wd 0.000001 --warmup_epochs 10 --start_warmup 0.3 --queue_length 0 --temperature 0.1 --epsilon 0.05",
    train={
        "optimizer": "lars",
        "lr": 0.3,  # 4.8 x 256 / 4096
        "min_lr": 0.0048,
        "warmup_epochs": 10,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "momentum": 0.9,
        "clip_grad": 0.0,
    },
    options={
        "temperature": 0.1,
        "epsilon": 0.05,
        "sinkhorn_iterations": 3,
        "queue_length": 0,
        "global_crops_scale": (0.14, 1.0),
        "local_crops_scale": (0.05, 0.14),
    },
)

CROPS_FOR_ASSIGN = (0, 1)  # the codes come from the two global crops, as every reference command


@dataclass
class SwAVConfig:
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    num_prototypes: int | None = None  # None: 3000 above 64 px (the paper), 300 on small images
    local_crops_number: int = 6
    global_crops_scale: tuple[float, float] = (0.14, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.14)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0
    # The reference's small-batch commands (batch 256): --queue_length 3840 --epoch_queue_starts 15
    queue_length: int = 0
    epoch_queue_starts: int = 15

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        positive = {"temperature": self.temperature, "epsilon": self.epsilon}
        counts = {
            "proj_hidden_dim": self.proj_hidden_dim,
            "proj_dim": self.proj_dim,
            "num_prototypes": 1 if self.num_prototypes is None else self.num_prototypes,
            "sinkhorn_iterations": self.sinkhorn_iterations,
        }
        for name, value in positive.items():
            if not value > 0:
                raise SSLBenchError(f"swav.{name} must be > 0, got {value}")
        for name, value in counts.items():
            if value < 1:
                raise SSLBenchError(f"swav.{name} must be >= 1, got {value}")
        nonnegative = {
            "local_crops_number": self.local_crops_number,
            "freeze_prototypes_epochs": self.freeze_prototypes_epochs,
            "queue_length": self.queue_length,
            "epoch_queue_starts": self.epoch_queue_starts,
        }
        for name, value in nonnegative.items():
            if value < 0:
                raise SSLBenchError(f"swav.{name} must be >= 0, got {value}")
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise SSLBenchError(f"swav.{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")


def _forget_queue_state(module: nn.Module, incompatible_keys: object) -> None:
    """A loaded queue is looked at afresh: whether it is full is a property of the loaded buffer."""
    module._queue_full = False


def rank_share(queue: Tensor) -> Tensor:
    """This rank's rows of a queue every rank holds alike: slice ``rank`` of ``world_size`` equal ones.

    The reference keeps on each rank that rank's own ``queue_length / world_size`` past embeddings. The
    Sinkhorn sums run over every rank and the codes of a sample do not depend on which rank holds which
    queued row, so disjoint equal slices of the common queue give the same codes: together they are the
    newest ``queue_length`` rows of the global batch, as the reference's queues are (rows past a multiple
    of ``world_size`` are left out, as the reference trims its length).
    """
    share = queue.shape[0] // world_size()
    return queue[rank() * share : (rank() + 1) * share]


@register_method("swav")
class SwAV(Method):
    paper = "Caron et al. 2020, arXiv 2006.09882"
    Config = SwAVConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return LARS_RECIPE if family == "resnet" else None  # the paper trained ResNets only

    def __init__(self, backbone: Backbone, config: SwAVConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if config.num_prototypes is None:
            config.num_prototypes = 300 if context.image_size <= SMALL_IMAGE_MAX else 3000
        self.projection_head = nn.Sequential(
            nn.Linear(backbone.feat_dim, config.proj_hidden_dim),
            nn.BatchNorm1d(config.proj_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(config.proj_hidden_dim, config.proj_dim),
        )
        self.prototypes = nn.Linear(config.proj_dim, config.num_prototypes, bias=False)
        # Past embeddings of each global crop, every rank's rows in rank order (identical on every rank,
        # so the main rank's checkpoint holds all of it), written as a ring from queue_pointer.
        self.register_buffer(
            "queue", torch.zeros(len(CROPS_FOR_ASSIGN), config.queue_length, config.proj_dim)
        )
        self.register_buffer("queue_pointer", torch.zeros(len(CROPS_FOR_ASSIGN), dtype=torch.long))
        self._queue_full = False  # a cache of the host's look at the buffer, as the reference's use_the_queue
        self.register_load_state_dict_post_hook(_forget_queue_state)

    def view_recipe(self) -> ViewRecipe:
        cfg = self.config
        return ViewRecipe(
            "symmetric",
            num_local_crops=cfg.local_crops_number,
            global_scale=tuple(cfg.global_crops_scale),
            local_scale=tuple(cfg.local_crops_scale),
        )

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        cfg = self.config
        with torch.no_grad():  # as the reference, before the forward: the scores are cosines
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        embeddings = multicrop_forward(self.backbone, views, self._embed)
        with torch.autocast(embeddings[0].device.type, enabled=False):  # tau = 0.1 magnifies rounding
            scores = list(self.prototypes(torch.cat(embeddings)).chunk(len(views)))
        use_queue = self._queue_in_use(step)  # the queue as it was before this step's embeddings
        with torch.no_grad():
            codes = [
                codes_with_queue(
                    scores[crop],
                    self._queue_scores(i) if use_queue else None,
                    cfg.epsilon,
                    cfg.sinkhorn_iterations,
                )
                for i, crop in enumerate(CROPS_FOR_ASSIGN)
            ]
            if self._queue_started(step):
                for i, crop in enumerate(CROPS_FOR_ASSIGN):
                    enqueue(self.queue[i], self.queue_pointer[i : i + 1], embeddings[crop])
        loss = swav_loss(scores, codes, cfg.temperature)
        logs: dict = {"queue_in_use": float(use_queue)}
        if step.diagnose:
            logs["code_entropy"] = torch.stack([entropy(q) for q in codes]).mean()
        global_embeddings = torch.cat([embeddings[crop] for crop in CROPS_FOR_ASSIGN])
        return StepOutput(loss, logs, embeddings=global_embeddings)

    def _embed(self, features: Tensor) -> Tensor:
        """``z = g(f(x)) / ||g(f(x))||``; the head's last layer and the normalisation in fp32."""
        hidden = self.projection_head[:-1](features)
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize(self.projection_head[-1](hidden.float()), dim=1)

    def _queue_started(self, step: Step) -> bool:
        return self.config.queue_length > 0 and step.epoch >= self.config.epoch_queue_starts

    def _queue_in_use(self, step: Step) -> bool:
        """Started and full, the reference's test: its last row is written (one look at the device until
        then, none after)."""
        if not self._queue_started(step):
            return False
        if not self._queue_full:
            self._queue_full = bool(self.queue[0, -1].any())
        return self._queue_full

    @torch.no_grad()
    def _queue_scores(self, index: int) -> Tensor:
        """This rank's share of the queue of global crop ``index``, scored against the current prototypes."""
        rows = rank_share(self.queue[index])
        with torch.autocast(rows.device.type, enabled=False):
            return rows @ self.prototypes.weight.t()

    def parameter_rules(self) -> list[ParameterRule]:
        return [ParameterRule(self.prototypes, frozen_epochs=self.config.freeze_prototypes_epochs)]
