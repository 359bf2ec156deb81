"""iBOT: image BERT pre-training with an online tokenizer.

Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv 2111.07832.

- Student and teacher: the same ViT + iBOT head; the teacher is an EMA of the student (0.996 -> 1 on a
  cosine, applied by the runner through ``momentum_pairs``) and sees the whole global crops.
- Class tokens (``L_[CLS]``, Sec. 3.2): DINO's cross-entropy ``H(P_t^cls(u), P_s^cls(v))`` between each
  teacher global crop ``u`` and every other student crop ``v`` (local crops included), the teacher
  centred (momentum 0.9) and sharpened at tau_t (0.04 -> 0.07 over 30 epochs), weight ``lambda1``.
  The student's global class tokens come from its masked crops, as in the reference.
- Masked image modelling (``L_MIM``, Eq. 2): in the student's global crops the embeddings of block-wise
  masked patches are replaced by a learnable mask token ``e_[MASK]`` (the reference's ``masked_embed``,
  zeros at start); ``-sum_i m_i P_t^patch(u)_i^T log P_s^patch(u_hat)_i`` averaged per image over its
  masked patches, then over the images (an image without masked patches adds 0), weight ``lambda2``.
  The patch outputs have their own centre (momentum 0.9, the mean over every patch of every image) and
  teacher temperature (0.04 -> 0.07, the reference's ``teacher_patch_temp``).
- Masks (``ibot_masks``): DINOv2's rule, exactly half of the global crops masked with ratios spread
  evenly over [0.1, 0.5]; the reference (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``) masks each crop
  with probability 1/2 at a ratio uniform in [0.1, 0.5], the same expectation. Local crops: class-token
  loss only, no mask. Drawn for the global batch from a ``MaskSeed`` (the same on every rank and on
  resume) and cut by rank, so 2 ranks mask as 1 process.
- Head: one DINO head projects class and patch tokens (the ViT-S/16 command's ``--shared_head true``,
  8192 outputs); ``shared_head=False`` gives the patch tokens a head of their own. Last layer frozen in
  epoch 1; evaluation reads the teacher.
- DINOv2's changes (Oquab et al. 2023, arXiv 2304.07193) are options of this class, which the
  ``dinov2`` method sets as its defaults: ``centering="sinkhorn_knopp"``, ``koleo_weight``,
  ``shared_head=False``, and a teacher temperature stepped per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench import (
    SMALL_IMAGE_MAX,
    Backbone,
    DINOHead,
    MaskSeed,
    Method,
    PaperRecipe,
    ParameterRule,
    SSLBenchError,
    Step,
    StepOutput,
    TrainContext,
    ViewRecipe,
    dino_loss,
    dino_pairs,
    ema_copy,
    entropy,
    ibot_masks,
    koleo_loss,
    linear_warmup_then_constant,
    multi_crop,
    multicrop_forward,
    rank_rows,
    register_method,
    sinkhorn_knopp,
    updated_center,
    updated_patch_center,
    world_size,
)

CENTERINGS = ("ema", "sinkhorn_knopp")
SINKHORN_ITERATIONS = 3  # DINOv2's sinkhorn_knopp_teacher

# --recipe paper: the iBOT README's ViT-S/16 command (16 GPUs x 64 images, 800 epochs), every flag it
# leaves out at main_ibot.py's default. Its scale (epochs, batch, 10 local crops) is the run's.
VIT_RECIPE = PaperRecipe(
    "vit",
    "the iBOT README's ViT-S/16 command: --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 "
    "--norm_last_layer false --shared_head true --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 "
    "(main_ibot.py's defaults for the rest)",
    train={
        "optimizer": "adamw",
        "lr": 5e-4,
        "min_lr": 1e-6,
        "warmup_epochs": 10,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "momentum": 0.9,
        "clip_grad": 3.0,
        "ema_momentum": 0.996,
        "ema_momentum_end": 1.0,
    },
    options={
        "global_crops_scale": (0.25, 1.0),
        "local_crops_scale": (0.05, 0.25),
        "teacher_temp": 0.07,
        "warmup_teacher_temp_epochs": 30.0,
        "norm_last_layer": False,
        "shared_head": True,
    },
)


@dataclass
class IBOTConfig:
    section: ClassVar[str] = "ibot"  # the name in error messages

    out_dim: int | None = None  # None: 8192 above 64 px (the ViT-S/16 command), 4096 on small images
    patch_out_dim: int | None = None  # None: out_dim (both references use one size)
    shared_head: bool = True  # one head for class and patch tokens; False: a second head for patches
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False  # the ViT-S/16 command
    local_crops_number: int = 10  # the ViT-S/16 command (main_ibot.py's default: 0)
    global_crops_scale: tuple[float, float] = (0.25, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.25)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9
    patch_center_momentum: float = 0.9
    lambda1: float = 1.0  # class-token loss weight
    lambda2: float = 1.0  # masked patch loss weight
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5  # the fraction of global crops that are masked
    centering: str = "ema"  # or "sinkhorn_knopp" (DINOv2)
    koleo_weight: float = 0.0  # DINOv2: 0.1, on the student backbone's class tokens per global crop
    freeze_last_layer_epochs: float = 1.0

    def __post_init__(self) -> None:  # caught when the config is read, before anything trains
        name = self.section
        if self.centering not in CENTERINGS:
            raise SSLBenchError(
                f"{name}.centering must be one of {', '.join(CENTERINGS)}, got '{self.centering}'"
            )
        low, high = self.mask_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise SSLBenchError(
                f"{name}.mask_ratio must satisfy 0 <= low <= high <= 1, got {self.mask_ratio}"
            )
        if not 0.0 < self.mask_probability <= 1.0:
            raise SSLBenchError(f"{name}.mask_probability must be in (0, 1], got {self.mask_probability}")
        if self.local_crops_number < 0:
            raise SSLBenchError(f"{name}.local_crops_number must be >= 0, got {self.local_crops_number}")
        for field in ("koleo_weight", "lambda1", "lambda2"):
            if not getattr(self, field) >= 0:  # NaN fails too
                raise SSLBenchError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")
        temps = (
            "student_temp",
            "teacher_temp",
            "warmup_teacher_temp",
            "teacher_patch_temp",
            "warmup_teacher_patch_temp",
        )
        for field in temps:
            if not getattr(self, field) > 0:
                raise SSLBenchError(f"{name}.{field} must be > 0, got {getattr(self, field)}")
        sizes = (self.out_dim, self.patch_out_dim)
        if self.shared_head and None not in sizes and sizes[0] != sizes[1]:
            raise SSLBenchError(
                f"{name}.shared_head projects class and patch tokens alike: patch_out_dim "
                f"{self.patch_out_dim} must equal out_dim {self.out_dim} (or set shared_head=false)"
            )


def sinkhorn_teacher_logits(teacher_out: list[Tensor], teacher_temp: float) -> list[Tensor]:
    """DINOv2's class-token targets: Sinkhorn-Knopp codes of every global crop together at epsilon = tau_t,
    as log-probabilities that ``dino_loss`` reads with a zero centre at temperature 1 (``softmax(log q) =
    q``: the student side is DINO's, only the teacher's distribution changes)."""
    codes = sinkhorn_knopp(torch.cat(teacher_out), epsilon=teacher_temp, iterations=SINKHORN_ITERATIONS)
    return list(codes.clamp_min(torch.finfo(codes.dtype).tiny).log().chunk(len(teacher_out)))


def masked_patch_loss(student: Tensor, targets: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """``L_MIM`` on the masked patches alone, as DINOv2's ``forward_masked``: per image
    ``-sum_i m_i q_i^T log softmax(s_i / tau_s) / max(1, sum_i m_i)``, averaged over every crop of
    ``masks`` (B, N), masked or not: ``sslbench.ibot_patch_loss`` without projecting visible patches.

    ``student`` (M, K) logits and ``targets`` (M, K) probabilities of the ``M`` masked patches, in the
    order of ``masks.nonzero()``. Only masked patches enter the loss, so only they are projected: the
    head's output over every patch (B * N * K, 65536 prototypes for DINOv2) is the largest tensor of a step.
    """
    logp = F.log_softmax(student.float() / student_temp, dim=-1)
    cross_entropy = torch.sum(-targets * logp, dim=-1)
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1).to(logp.dtype)
    weights = per_image.unsqueeze(1).expand_as(masks)[masks]
    return (cross_entropy * weights).sum() / masks.shape[0]


@register_method("ibot")
class IBOT(Method):
    paper = "Zhou et al. 2022, arXiv 2111.07832"
    Config = IBOTConfig
    families = ("vit",)
    default_out_dims: ClassVar[tuple[int, int]] = (4096, 8192)  # (<= 64 px, larger images)
    temperature_per_iteration: ClassVar[bool] = False  # iBOT steps its temperatures per epoch

    @classmethod
    def paper_recipe(cls, family: str, image_size: int, epochs: int) -> PaperRecipe | None:
        return VIT_RECIPE if family == "vit" else None

    def __init__(self, backbone: Backbone, config: IBOTConfig, context: TrainContext) -> None:
        super().__init__(backbone, config, context)
        if backbone.family not in self.families:
            family = backbone.family
            raise SSLBenchError(
                f"{self.name} masks patch tokens and trains ViTs only, not {backbone.arch} ({family})"
            )
        if config.out_dim is None:
            config.out_dim = self.default_out_dims[context.image_size > SMALL_IMAGE_MAX]
        if config.patch_out_dim is None:
            config.patch_out_dim = config.out_dim
        config.__post_init__()  # the resolved sizes, checked again
        self.head = self._new_head(config.out_dim)
        self.patch_head = None if config.shared_head else self._new_head(config.patch_out_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.feat_dim))
        self.mask_seed = MaskSeed()  # masks alike on every rank and on resume
        self.teacher_backbone = ema_copy(backbone)
        self.teacher_head = ema_copy(self.head)
        self.teacher_patch_head = None if self.patch_head is None else ema_copy(self.patch_head)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, config.patch_out_dim))
        per_epoch = context.iterations_per_epoch if self.temperature_per_iteration else 1
        warmup, epochs = config.warmup_teacher_temp_epochs, context.epochs
        self.teacher_temps = linear_warmup_then_constant(
            config.warmup_teacher_temp, config.teacher_temp, warmup, epochs, per_epoch
        )
        self.teacher_patch_temps = linear_warmup_then_constant(
            config.warmup_teacher_patch_temp, config.teacher_patch_temp, warmup, epochs, per_epoch
        )

    def _new_head(self, out_dim: int) -> DINOHead:
        cfg = self.config
        return DINOHead(
            self.backbone.feat_dim,
            out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            norm_last_layer=cfg.norm_last_layer,
        )

    def view_recipe(self) -> ViewRecipe:
        cfg = self.config
        return multi_crop(cfg.local_crops_number, tuple(cfg.global_crops_scale), tuple(cfg.local_crops_scale))

    def draw_masks(self, global_crops: Tensor, iteration: int = 0) -> Tensor:
        """Bool (2B, N) block masks of the concatenated global crops, both crops in one draw (DINOv2's
        collate) for the whole global batch, from the step's ``MaskSeed`` generator (the same on every
        rank, and again on resume); each rank keeps its images' rows (``rank_rows``)."""
        cfg = self.config
        grid = self.backbone.grid(global_crops.shape[-1])
        local = global_crops.shape[0] // 2
        masks = ibot_masks(  # drawn for the global batch, then this rank's rows: 2 ranks mask as 1 process
            2 * local * world_size(),
            grid,
            tuple(cfg.mask_ratio),
            cfg.mask_probability,
            generator=self.mask_seed.generator(iteration),
        )
        masks = rank_rows(masks.view(2, local * world_size(), -1), dim=1).reshape(2 * local, -1)
        return masks.to(global_crops.device)

    def temperatures(self, step: Step) -> tuple[float, float]:
        """The teacher's class-token and patch temperatures at ``step``."""
        index = step.iteration if self.temperature_per_iteration else step.epoch
        index = min(index, len(self.teacher_temps) - 1)
        return float(self.teacher_temps[index]), float(self.teacher_patch_temps[index])

    def training_step(self, views: list[Tensor], labels: Tensor, step: Step) -> StepOutput:
        cfg = self.config
        global_crops = torch.cat(views[:2])
        masks = self.draw_masks(global_crops, step.iteration)
        temp, patch_temp = self.temperatures(step)
        with torch.no_grad():  # teacher first (a lower peak): the whole crops, no mask
            teacher_cls, teacher_patches = self.teacher_backbone.forward_tokens(global_crops)
            teacher_out = list(self.teacher_head(teacher_cls).chunk(2))
            patch_targets, teacher_patch_out = self.patch_targets(teacher_patches, masks, patch_temp)
        cls, patches = self.backbone.forward_tokens(global_crops, mask=masks, mask_token=self.mask_token[0])
        local = multicrop_forward(self.backbone, views[2:]) if len(views) > 2 else []
        student_out = list(self.head(torch.cat([cls, *local])).chunk(len(views)))
        student_patches = (self.head if self.patch_head is None else self.patch_head)(patches[masks])
        teacher_logits, center, cls_temp = self.class_targets(teacher_out, temp)
        cls_loss = dino_loss(student_out, teacher_logits, center, cfg.student_temp, cls_temp)
        patch_loss = masked_patch_loss(student_patches, patch_targets, masks, cfg.student_temp)
        loss = cfg.lambda1 * cls_loss + cfg.lambda2 * patch_loss
        logs: dict = {
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "teacher_temp": temp,
            "teacher_patch_temp": patch_temp,
            "masked_fraction": masks.float().mean(),
        }
        if cfg.koleo_weight > 0:  # DINOv2: one term per global crop, on the backbone's class tokens
            koleo = cfg.koleo_weight * sum(koleo_loss(c) for c in cls.chunk(2))
            loss = loss + koleo
            logs["koleo_loss"] = koleo.detach()
        if step.diagnose:
            logs |= self._collapse_logs(student_out, teacher_logits, center, cls_temp)
        if cfg.centering == "ema":
            self.center.copy_(updated_center(self.center, teacher_out, cfg.center_momentum))
            self.patch_center.copy_(
                updated_patch_center(self.patch_center, [teacher_patch_out], cfg.patch_center_momentum)
            )
        return StepOutput(loss, logs, embeddings=torch.cat(student_out[:2]))

    def class_targets(self, teacher_out: list[Tensor], temp: float) -> tuple[list[Tensor], Tensor, float]:
        """``(teacher logits, centre, temperature)`` as ``dino_loss`` takes them: the running centre at tau_t,
        or Sinkhorn-Knopp codes as log-probabilities with a zero centre at temperature 1."""
        if self.config.centering == "ema":
            return teacher_out, self.center, temp
        return sinkhorn_teacher_logits(teacher_out, temp), torch.zeros_like(self.center), 1.0

    @torch.no_grad()
    def patch_targets(
        self, teacher_patches: Tensor, masks: Tensor, temp: float
    ) -> tuple[Tensor, Tensor | None]:
        """The teacher's distributions over the masked patches (M, K), and its projection of every patch
        (2B, N, K) where the running centre averages them (iBOT); Sinkhorn-Knopp codes of the masked
        patches alone otherwise (DINOv2: the count of masked patches over every rank is the batch)."""
        head = self.teacher_head if self.teacher_patch_head is None else self.teacher_patch_head
        if self.config.centering == "sinkhorn_knopp":
            rows = head(teacher_patches[masks])
            every_row = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
            return sinkhorn_knopp(rows, epsilon=temp, iterations=SINKHORN_ITERATIONS, valid=every_row), None
        projected = head(teacher_patches)
        return F.softmax((projected[masks] - self.patch_center[0]) / temp, dim=-1), projected

    @torch.no_grad()
    def _collapse_logs(
        self, student_out: list[Tensor], teacher_logits: list[Tensor], center: Tensor, temp: float
    ) -> dict[str, Tensor]:
        """DINO's collapse diagnostics on the class tokens: teacher entropy and KL(P_t || P_s) over the
        loss's pairs."""
        pairs = dino_pairs(student_out, teacher_logits, center, self.config.student_temp, temp)
        entropies = torch.stack([entropy(q) for q, _ in pairs])
        kls = torch.stack([(q * (q.clamp_min(1e-12).log() - logp)).sum(dim=-1).mean() for q, logp in pairs])
        return {"teacher_entropy": entropies.mean(), "teacher_student_kl": kls.mean()}

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]
        if self.patch_head is not None:
            pairs.append((self.patch_head, self.teacher_patch_head))
        return pairs

    def eval_backbone(self) -> Backbone:
        return self.teacher_backbone

    def parameter_rules(self) -> list[ParameterRule]:
        heads = [self.head] if self.patch_head is None else [self.head, self.patch_head]
        return [
            ParameterRule(h.last_layer, frozen_epochs=self.config.freeze_last_layer_epochs) for h in heads
        ]
