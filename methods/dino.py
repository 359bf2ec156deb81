"""DINO: self-distillation with no labels.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv 2104.14294.

- Student ``g_s`` and teacher ``g_t``: the same backbone + ``DINOHead``; the teacher is an EMA of the
  student, ``theta_t <- l theta_t + (1 - l) theta_s`` with ``l`` 0.996 -> 1 on a cosine (Eq. 2;
  applied by the runner through ``momentum_pairs``).
- Multi-crop: the teacher sees the 2 global crops, the student every crop.
- Loss (Eq. 1-3): ``sum_{x in globals} sum_{x' != x} H(P_t(x), P_s(x'))`` with
  ``P_s = softmax(g_s / tau_s)``, ``P_t = softmax((g_t - C) / tau_t)``; see ``sslbench.losses.dino_loss``.
- Centering (Eq. 4): ``C <- m C + (1 - m) mean(g_t)`` with m = 0.9; sharpening by tau_t = 0.04
  (optionally warmed up from ``warmup_teacher_temp``) against tau_s = 0.1.
- The last layer of the student head is frozen during the first epoch (reference recipe).
- The paper's ablations are options of this one method: its collapse study (Sec. 5.3, Fig. 7)
  ``center_momentum=1`` (no centering) and ``teacher_temp=student_temp`` (no sharpening), and Table 7's
  EMA momentum 0 (no momentum teacher), ``loss=mse``, ``predictor=true`` and ``local_crops_number=0``
  (no multi-crop); see ``sslbench ablate``.
- Two of DINOv2's changes (Oquab et al. 2023, arXiv 2304.07193, Sec. 4) are options, off by default:
  ``centering="sinkhorn_knopp"`` replaces the teacher's centred softmax by Sinkhorn-Knopp codes of the two
  global crops together (3 iterations, epsilon = tau_t; the center is then unused and not updated), and
  ``koleo_weight`` adds ``w * sum_crops L_koleo`` on the student backbone's class tokens (before the head),
  one term per global crop, as the DINOv2 reference (``ssl_meta_arch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    DINOHead,
    Method,
    MLPHead,
    PaperRecipe,
    ParameterRule,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    dino_loss,
    dino_mse_loss,
    dino_pairs,
    ema_copy,
    entropy,
    koleo_loss,
    linear_warmup_then_constant,
    multi_crop,
    multicrop_forward,
    register_method,
    sinkhorn_knopp,
    updated_center,
)

LOSSES = {"cross_entropy": dino_loss, "mse": dino_mse_loss}
CENTERINGS = ("ema", "sinkhorn_knopp")
SINKHORN_ITERATIONS = 3  # DINOv2's sinkhorn_knopp_teacher


def sinkhorn_teacher_logits(teacher_out: list[Tensor], teacher_temp: float) -> list[Tensor]:
    """DINOv2's teacher targets: Sinkhorn-Knopp codes of every global crop together at epsilon = tau_t,
    returned as log-probabilities so the DINO losses read them with a zero center at temperature 1
    (``softmax(log q) = q``: the same student side, only the teacher's distribution changes)."""
    codes = sinkhorn_knopp(torch.cat(teacher_out), epsilon=teacher_temp, iterations=SINKHORN_ITERATIONS)
    return list(codes.clamp_min(torch.finfo(codes.dtype).tiny).log().chunk(len(teacher_out)))


# --recipe paper: the reference README's commands (facebookresearch/dino), every flag they leave out at
# main_dino.py's default. Their scale (100 epochs, 8 GPUs x 64 images, 8 local crops) is the preset's.
_REFERENCE_DEFAULTS = {
    "min_lr": 1e-6,
    "warmup_epochs": 10,
    "momentum": 0.9,
    "clip_grad": 3.0,
    "ema_momentum": 0.996,
    "ema_momentum_end": 1.0,
}
VIT_RECIPE = PaperRecipe(
    "vit",
    "the DINO README's ViT-S/16 command (main_dino.py's defaults)",
    train={"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4}
    | _REFERENCE_DEFAULTS,
    options={"global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.05, 0.4)},
)
RESNET_RECIPE = PaperRecipe(
    "resnet",
    "the DINO README's ResNet-50 command: --optimizer sgd --lr 0.03 --weight_decay 1e-4 "
    "--weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14",
    train={"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4}
    | _REFERENCE_DEFAULTS,
    options={"global_crops_scale": (0.14, 1.0), "local_crops_scale": (0.05, 0.14)},
)


@dataclass
class DINOConfig:
    out_dim: int | None = None  # None: 65536 above 64 px (the paper), 4096 on small images
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    local_crops_number: int = 8  # main_dino.py's default (2x224 + 8x96); the paper's best ViT-S used 10
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # the paper warms 0.04 -> 0.07 over 30 epochs for some runs
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    freeze_last_layer_epochs: int = 1
    loss: str = "cross_entropy"  # or "mse": the paper's ablation (Table 7)
    predictor: bool = False  # the paper's ablation (Table 7): a BYOL-style predictor on the student only
    centering: str = "ema"  # or "sinkhorn_knopp" (DINOv2)
    koleo_weight: float = 0.0  # DINOv2: 0.1

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        if self.loss not in LOSSES:
            raise SSLBenchError(f"dino.loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.centering not in CENTERINGS:
            raise SSLBenchError(
                f"dino.centering must be one of {', '.join(CENTERINGS)}, got '{self.centering}'"
            )
        if not self.koleo_weight >= 0:  # NaN fails too
            raise SSLBenchError(f"dino.koleo_weight must be >= 0, got {self.koleo_weight}")
        if self.local_crops_number < 0:
            raise SSLBenchError(f"dino.local_crops_number must be >= 0, got {self.local_crops_number}")


@register_method("dino")
class DINO(Method):
    paper = "Caron et al. 2021, arXiv 2104.14294"
    Config = DINOConfig

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe:
        return RESNET_RECIPE if family == "resnet" else VIT_RECIPE

    def __init__(self, backbone: Backbone, config: DINOConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if config.out_dim is None:
            config.out_dim = 4096 if context.image_size <= SMALL_IMAGE_MAX else 65536
        self.head = DINOHead(
            backbone.feat_dim,
            config.out_dim,
            config.hidden_dim,
            config.bottleneck_dim,
            norm_last_layer=config.norm_last_layer,
        )
        # Student-only predictor (ablation) on the head's bottleneck, as BYOL's on its projection: the
        # teacher path, and the inputs of every EMA-paired module, are unchanged.
        bottleneck = config.bottleneck_dim
        self.predictor = MLPHead(bottleneck, config.hidden_dim, bottleneck) if config.predictor else None
        self.teacher_backbone = ema_copy(backbone)
        self.teacher_head = ema_copy(self.head)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        # One value per epoch, as the reference's teacher_temp_schedule[epoch]
        self.teacher_temps = linear_warmup_then_constant(
            config.warmup_teacher_temp,
            config.teacher_temp,
            config.warmup_teacher_temp_epochs,
            context.epochs,
            1,
        )

    def view_recipe(self) -> ViewRecipe:
        cfg = self.config
        return multi_crop(cfg.local_crops_number, tuple(cfg.global_crops_scale), tuple(cfg.local_crops_scale))

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        # Teacher first, as the reference does: its temporaries are gone before the student's
        # activations build up (a lower peak; the teacher draws no randomness, so nothing else changes).
        with torch.no_grad():
            teacher_out = multicrop_forward(self.teacher_backbone, views[:2], self.teacher_head)
        # The backbone's class tokens stay at hand for KoLeo; the head still sees every crop in one batch.
        features = multicrop_forward(self.backbone, views)
        student_out = list(self.head(torch.cat(features), self.predictor).chunk(len(views)))
        teacher_temp = float(self.teacher_temps[min(step.epoch, len(self.teacher_temps) - 1)])
        teacher_logits, center, temp = self._teacher_targets(teacher_out, teacher_temp)
        loss = LOSSES[self.config.loss](student_out, teacher_logits, center, self.config.student_temp, temp)
        logs: dict = {"teacher_temp": teacher_temp}
        if self.config.koleo_weight > 0:
            koleo = self.config.koleo_weight * sum(koleo_loss(f) for f in features[:2])
            loss = loss + koleo
            logs["koleo_loss"] = koleo.detach()
        if step.diagnose:
            logs |= self._collapse_logs(student_out, teacher_logits, center, temp)
        if self.config.centering == "ema":
            self.center.copy_(updated_center(self.center, teacher_out, self.config.center_momentum))
        return StepOutput(loss, logs, embeddings=torch.cat(student_out[:2]))

    def _teacher_targets(
        self, teacher_out: list[Tensor], teacher_temp: float
    ) -> tuple[list[Tensor], Tensor, float]:
        """``(teacher logits, center, temperature)`` as the DINO losses take them: the running center at
        tau_t (Eq. 4), or DINOv2's Sinkhorn-Knopp codes as log-probabilities, zero center, temperature 1."""
        if self.config.centering == "ema":
            return teacher_out, self.center, teacher_temp
        return sinkhorn_teacher_logits(teacher_out, teacher_temp), torch.zeros_like(self.center), 1.0

    @torch.no_grad()
    def _collapse_logs(
        self, student_out: list[Tensor], teacher_logits: list[Tensor], center: Tensor, teacher_temp: float
    ) -> dict[str, Tensor]:
        """Teacher entropy h(P_t) and KL(P_t || P_s) over the loss's own view pairs (DINO paper, Sec. 5.3):
        for the cross-entropy loss, ``H(P_t, P_s) = h(P_t) + KL(P_t || P_s)``."""
        pairs = dino_pairs(student_out, teacher_logits, center, self.config.student_temp, teacher_temp)
        entropies = torch.stack([entropy(q) for q, _ in pairs])
        kls = torch.stack([(q * (q.clamp_min(1e-12).log() - logp)).sum(dim=-1).mean() for q, logp in pairs])
        return {"teacher_entropy": entropies.mean(), "teacher_student_kl": kls.mean()}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def eval_backbone(self) -> Backbone:
        return self.teacher_backbone

    def parameter_rules(self) -> list[ParameterRule]:
        return [ParameterRule(self.head.last_layer, frozen_epochs=self.config.freeze_last_layer_epochs)]
